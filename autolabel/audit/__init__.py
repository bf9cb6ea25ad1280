"""Audits over collected runs: specs, measurements with intervals, findings and run diffs."""

from autolabel.audit.measure import NothingToAudit
from autolabel.audit.spec import AuditSpec, load_spec
from autolabel.audit.stage import AuditResult, AuditSummary, audit_stage

__all__ = ["AuditResult", "AuditSpec", "AuditSummary", "NothingToAudit", "audit_stage", "load_spec"]
