"""Model organisms: the subject model fine-tuned with a planted quirk, and the audit of one against the base
model, the known answer that audits are measured by (benchmarks/audit_recall.py).

Only the spec is imported here, so the command line stays quick to start; the stages import torch."""

from autolabel.organism.spec import OrganismSpec, load_organism_spec

__all__ = ["OrganismSpec", "load_organism_spec"]
