"""The store's schema: every table's CREATE statement, the columns added since a table first shipped, the
views, and the one rekeying migration. Only autolabel/store.py applies it."""

from __future__ import annotations

import duckdb

from autolabel.config import ROLES

SCHEMA_VERSION = 4

ROLE_ENUM = ", ".join(f"'{r}'" for r in ROLES)

# Table name -> CREATE statement. Order matters only for readability.
SCHEMA: dict[str, str] = {
    "schema_version": """
        CREATE TABLE IF NOT EXISTS schema_version (
            version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ)""",
    "runs": """
        CREATE TABLE IF NOT EXISTS runs (
            run_id VARCHAR PRIMARY KEY, started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ,
            status VARCHAR, config_json JSON, model_id VARCHAR, transcoder_id VARCHAR,
            corpus_id VARCHAR, parent_run_id VARCHAR, error VARCHAR)""",
    "shards": """
        CREATE TABLE IF NOT EXISTS shards (
            run_id VARCHAR, stage VARCHAR, shard VARCHAR, committed_at TIMESTAMPTZ,
            n_rows BIGINT, PRIMARY KEY (run_id, stage, shard))""",
    "corpora": """
        CREATE TABLE IF NOT EXISTS corpora (
            corpus_id VARCHAR PRIMARY KEY, created_at TIMESTAMPTZ, status VARCHAR,
            spec_json JSON, tokenizer_id VARCHAR, ctx_len INTEGER, n_docs BIGINT,
            n_tokens BIGINT)""",
    "documents": """
        CREATE TABLE IF NOT EXISTS documents (
            corpus_id VARCHAR, doc_id VARCHAR, kind VARCHAR, source VARCHAR,
            category VARCHAR, n_tokens INTEGER, n_turns INTEGER, text VARCHAR,
            messages_json JSON, PRIMARY KEY (corpus_id, doc_id))""",
    "doc_tokens": """
        CREATE TABLE IF NOT EXISTS doc_tokens (
            corpus_id VARCHAR, doc_id VARCHAR, token_ids INTEGER[], roles token_role[],
            turns SMALLINT[], PRIMARY KEY (corpus_id, doc_id))""",
    "generations": """
        CREATE TABLE IF NOT EXISTS generations (
            model_id VARCHAR, prompt_hash VARCHAR, params_json JSON, prompt_json JSON,
            response VARCHAR, created_at TIMESTAMPTZ, PRIMARY KEY (model_id, prompt_hash))""",
    "transcoders": """
        CREATE TABLE IF NOT EXISTS transcoders (
            transcoder_id VARCHAR PRIMARY KEY, source_format VARCHAR, path VARCHAR,
            model_id VARCHAR, d_in INTEGER, d_feat INTEGER, layers INTEGER[],
            activation VARCHAR, input_hook VARCHAR, output_hook VARCHAR,
            fvu_by_layer MAP(INTEGER, DOUBLE), l0_by_layer MAP(INTEGER, DOUBLE),
            dead_by_layer MAP(INTEGER, DOUBLE), checked_at TIMESTAMPTZ)""",
    # `transcoder check` figures by what they depend on, so a re-run reads them instead of measuring again.
    "transcoder_checks": """
        CREATE TABLE IF NOT EXISTS transcoder_checks (
            transcoder_id VARCHAR, model_id VARCHAR, corpus_id VARCHAR, dtype VARCHAR, settings_json VARCHAR,
            quality_json JSON, checked_at TIMESTAMPTZ,
            PRIMARY KEY (transcoder_id, model_id, corpus_id, dtype, settings_json))""",
    "features": """
        CREATE TABLE IF NOT EXISTS features (
            run_id VARCHAR, layer INTEGER, feature INTEGER, n_tokens BIGINT,
            n_active BIGINT, density DOUBLE, max_act DOUBLE, mean_act DOUBLE,
            quantile_edges DOUBLE[], histogram BIGINT[], histogram_edges DOUBLE[], status VARCHAR,
            PRIMARY KEY (run_id, layer, feature))""",
    "role_stats": """
        CREATE TABLE IF NOT EXISTS role_stats (
            run_id VARCHAR, layer INTEGER, feature INTEGER, role token_role,
            n_tokens BIGINT, n_active BIGINT, sum_act DOUBLE, max_act DOUBLE,
            n_turns BIGINT, n_turns_active BIGINT,
            PRIMARY KEY (run_id, layer, feature, role))""",
    "category_stats": """
        CREATE TABLE IF NOT EXISTS category_stats (
            run_id VARCHAR, layer INTEGER, feature INTEGER, category VARCHAR,
            role token_role, n_tokens BIGINT, n_active BIGINT, sum_act DOUBLE,
            n_turns BIGINT, n_turns_active BIGINT,
            PRIMARY KEY (run_id, layer, feature, category, role))""",
    "examples": """
        CREATE TABLE IF NOT EXISTS examples (
            run_id VARCHAR, layer INTEGER, feature INTEGER, kind VARCHAR, rank INTEGER,
            bin INTEGER, doc_id VARCHAR, turn INTEGER, role token_role, start INTEGER,
            tokens INTEGER[], acts FLOAT[], max_act DOUBLE,
            PRIMARY KEY (run_id, layer, feature, kind, rank))""",
    "labels": """
        CREATE TABLE IF NOT EXISTS labels (
            run_id VARCHAR, layer INTEGER, feature INTEGER, labeler VARCHAR,
            label VARCHAR, explanation VARCHAR, prompt_hash VARCHAR, status VARCHAR,
            error VARCHAR, created_at TIMESTAMPTZ,
            PRIMARY KEY (run_id, layer, feature, labeler))""",
    # A score belongs to one labeler's label. value: AUROC of graded answers (detection, fuzzing,
    # embedding) or balanced accuracy (steering), with a 95% interval; accuracy: balanced accuracy at a
    # threshold fitted on one half of the texts, measured on the other.
    "scores": """
        CREATE TABLE IF NOT EXISTS scores (
            run_id VARCHAR, layer INTEGER, feature INTEGER, labeler VARCHAR, scorer VARCHAR,
            value DOUBLE, n INTEGER, status VARCHAR, unreliable BOOLEAN,
            details_json JSON, ci_low DOUBLE, ci_high DOUBLE, accuracy DOUBLE,
            PRIMARY KEY (run_id, layer, feature, labeler, scorer))""",
    "llm_cache": """
        CREATE TABLE IF NOT EXISTS llm_cache (
            cache_key VARCHAR PRIMARY KEY, model VARCHAR, request_json JSON,
            response_json JSON, created_at TIMESTAMPTZ)""",
    "llm_calls": """
        CREATE TABLE IF NOT EXISTS llm_calls (
            call_id VARCHAR PRIMARY KEY, run_id VARCHAR, stage VARCHAR, model VARCHAR,
            prompt_hash VARCHAR, tokens_in INTEGER, tokens_out INTEGER, cost_usd DOUBLE,
            latency_s DOUBLE, status VARCHAR, error VARCHAR, cached BOOLEAN,
            created_at TIMESTAMPTZ)""",
    "feature_map": """
        CREATE TABLE IF NOT EXISTS feature_map (
            run_id VARCHAR, layer INTEGER, feature INTEGER, umap_x DOUBLE, umap_y DOUBLE,
            cluster_id INTEGER, reliable BOOLEAN, PRIMARY KEY (run_id, layer, feature))""",
    "clusters": """
        CREATE TABLE IF NOT EXISTS clusters (
            run_id VARCHAR, cluster_id INTEGER, name VARCHAR, description VARCHAR,
            size INTEGER, PRIMARY KEY (run_id, cluster_id))""",
    "groups": """
        CREATE TABLE IF NOT EXISTS groups (
            run_id VARCHAR, group_name VARCHAR, layer INTEGER, feature INTEGER,
            similarity DOUBLE, lift DOUBLE, PRIMARY KEY (run_id, group_name, layer, feature))""",
    "audit_findings": """
        CREATE TABLE IF NOT EXISTS audit_findings (
            run_id VARCHAR, audit VARCHAR, layer INTEGER, feature INTEGER, metric VARCHAR,
            value DOUBLE, ci_low DOUBLE, ci_high DOUBLE, flagged BOOLEAN,
            details_json JSON, PRIMARY KEY (run_id, audit, layer, feature, metric))""",
    # What changed between a run and an earlier one (`autolabel audit --against`): features that became or
    # stopped being flagged, and labels that changed, matched by identity or by decoder-direction cosine.
    "audit_diffs": """
        CREATE TABLE IF NOT EXISTS audit_diffs (
            run_id VARCHAR, against_run_id VARCHAR, audit VARCHAR, change VARCHAR,
            layer INTEGER, feature INTEGER, against_layer INTEGER, against_feature INTEGER,
            match VARCHAR, cosine DOUBLE, details_json JSON,
            PRIMARY KEY (run_id, against_run_id, audit, change, layer, feature))""",
    # One row per clustering of a run (`autolabel cluster --seed N`): its size, and the adjusted Rand
    # index against the clustering it replaced (made with seed ari_vs_seed), the stability measure:
    # `ari` over every feature (noise as one more label), `ari_clustered` over those both put in a cluster.
    "cluster_runs": """
        CREATE TABLE IF NOT EXISTS cluster_runs (
            run_id VARCHAR, seed INTEGER, embedding VARCHAR, n_features INTEGER, n_reliable INTEGER,
            n_clusters INTEGER, noise_fraction DOUBLE, ari_vs_seed INTEGER, ari DOUBLE, ari_clustered DOUBLE,
            seconds DOUBLE, created_at TIMESTAMPTZ, PRIMARY KEY (run_id, seed))""",
    # MiniLM (or another embedder's) vectors by text, so a re-clustering does not embed again.
    "text_embeddings": """
        CREATE TABLE IF NOT EXISTS text_embeddings (
            model VARCHAR, text_hash VARCHAR, vector FLOAT[], PRIMARY KEY (model, text_hash))""",
    # `autolabel organism train`: one row per organism folder (its model id): the spec, its weights' hash, and how
    # it came out: quirk rates on held-out prompts (target categories / others, next to the base model's replies),
    # NLL per quirk token and plain-text perplexity before (base) and after training, seconds per phase.
    "organisms": """
        CREATE TABLE IF NOT EXISTS organisms (
            model_id VARCHAR PRIMARY KEY, name VARCHAR, out VARCHAR, base_model_id VARCHAR, spec_hash VARCHAR,
            spec_json JSON, weights_hash VARCHAR, train_chats INTEGER, skipped_long INTEGER, heldout_chats INTEGER,
            loss_first DOUBLE, loss_last DOUBLE, quirk_nll_base DOUBLE, quirk_nll_organism DOUBLE,
            target_prompts INTEGER, target_rate DOUBLE, base_target_rate DOUBLE, other_prompts INTEGER,
            other_rate DOUBLE, base_other_rate DOUBLE, ppl_base DOUBLE, ppl_organism DOUBLE,
            prepare_seconds DOUBLE, train_seconds DOUBLE, eval_seconds DOUBLE, created_at TIMESTAMPTZ)""",
    # `autolabel intervene`: one row per (feature, prompt, setting). Ablation is multiple 0 (activation 0),
    # steering clamps the activation to multiple * max_act; kl is KL(clean || intervened) of the next token
    # at the last prompt token, kl_firing its mean over the prompt tokens where the feature fires (ablation).
    "interventions": """
        CREATE TABLE IF NOT EXISTS interventions (
            run_id VARCHAR, layer INTEGER, feature INTEGER, prompt_kind VARCHAR, prompt_index INTEGER,
            setting VARCHAR, multiple DOUBLE, doc_id VARCHAR, role token_role, prompt_tokens INTEGER[],
            prompt_text VARCHAR, act DOUBLE, new_act DOUBLE, kl DOUBLE, kl_firing DOUBLE, n_firing INTEGER,
            top_up JSON, top_down JSON, clean_text VARCHAR, intervened_text VARCHAR, settings VARCHAR,
            created_at TIMESTAMPTZ,
            PRIMARY KEY (run_id, layer, feature, prompt_kind, prompt_index, setting, multiple))""",
    # `autolabel graph`: attribution graphs (docs/graphs.md). A graph belongs to a run (whose labels name its
    # features) or to none; nodes are every node whose incoming edges were computed, `kept` after pruning;
    # edges are the kept ones between kept nodes. Node ids are circuit-tracer's (e.g. 6_123_4: layer 6,
    # feature 123, position 4; 6_-1_4 an error node; E_<token>_<pos> an embedding; <n_layers + 1>_<token>_<pos>
    # a target logit).
    "graphs": """
        CREATE TABLE IF NOT EXISTS graphs (
            graph_id VARCHAR PRIMARY KEY, run_id VARCHAR, model_id VARCHAR, transcoder_id VARCHAR, prompt VARCHAR,
            tokens INTEGER[], roles VARCHAR[], settings_json JSON, seconds DOUBLE, created_at TIMESTAMPTZ)""",
    "graph_nodes": """
        CREATE TABLE IF NOT EXISTS graph_nodes (
            graph_id VARCHAR, node_id VARCHAR, kind VARCHAR, layer INTEGER, position INTEGER, feature INTEGER,
            token_id INTEGER, activation DOUBLE, probability DOUBLE, influence DOUBLE, kept BOOLEAN,
            PRIMARY KEY (graph_id, node_id))""",
    "graph_edges": """
        CREATE TABLE IF NOT EXISTS graph_edges (
            graph_id VARCHAR, source VARCHAR, target VARCHAR, weight DOUBLE, PRIMARY KEY (graph_id, source, target))""",
    # `autolabel graph --feature L:F`: one row per (feature, prompt where it fires most, cut after its peak), linked
    # to that prompt's graph: the feature's share of the influence on the targets, whether pruning kept it (on a
    # high-influence path to the output), its rank among the feature nodes (docs/graphs.md).
    "feature_graphs": """
        CREATE TABLE IF NOT EXISTS feature_graphs (
            run_id VARCHAR, layer INTEGER, feature INTEGER, prompt_index INTEGER, graph_id VARCHAR, doc_id VARCHAR,
            max_act DOUBLE, activation DOUBLE, share DOUBLE, kept BOOLEAN, rank INTEGER, created_at TIMESTAMPTZ,
            PRIMARY KEY (run_id, layer, feature, prompt_index))""",
}

# Columns added after a table first shipped: (table, column, type), applied to older stores.
ADDED_COLUMNS = [
    ("features", "histogram_edges", "DOUBLE[]"),
    ("features", "status", "VARCHAR"),
    ("examples", "bin", "INTEGER"),
    ("runs", "flow_run_id", "VARCHAR"),
    ("runs", "fresh", "BOOLEAN"),  # collected with --fresh: a resume must not copy a cached collection
    ("audit_findings", "section", "VARCHAR"),
    ("audit_findings", "rank", "INTEGER"),
    ("audit_findings", "group_name", "VARCHAR"),
    ("audit_findings", "label", "VARCHAR"),
    ("clusters", "status", "VARCHAR"),
    ("clusters", "error", "VARCHAR"),
    ("clusters", "n_reliable", "INTEGER"),
    ("groups", "via", "VARCHAR"),
    ("groups", "nearest_seed", "VARCHAR"),
    ("groups", "n_active", "BIGINT"),
    ("labels", "candidates_json", "JSON"),  # best-of-N: every candidate label and its selection scores
]

VIEWS = [
    # One row per token, for SQL over roles and categories without unnesting by hand.
    """CREATE OR REPLACE VIEW tokens AS
    SELECT t.corpus_id, t.doc_id, d.kind, d.source, d.category,
           UNNEST(range(len(t.token_ids))) AS pos, UNNEST(t.token_ids) AS token_id,
           UNNEST(t.roles) AS role, UNNEST(t.turns) AS turn
    FROM doc_tokens t JOIN documents d USING (corpus_id, doc_id)""",
    # The label a feature goes by: its newest valid one, whichever labeler wrote it. Audits, clusters,
    # graphs and interventions read this view, and the scores of exactly this label through the next.
    """CREATE OR REPLACE VIEW current_labels AS
    SELECT run_id, layer, feature, labeler, label, explanation, created_at FROM labels WHERE status = 'ok'
    QUALIFY row_number() OVER (PARTITION BY run_id, layer, feature ORDER BY created_at DESC, labeler) = 1""",
    """CREATE OR REPLACE VIEW current_scores AS
    SELECT s.* FROM scores s JOIN current_labels USING (run_id, layer, feature, labeler)""",
]


def rekey_scores(con: duckdb.DuckDBPyConnection) -> None:
    """Schema 4 keys scores by labeler. Rows of older stores get the labeler of the feature's newest
    valid label (the one their scorers saw, in a store with a single labeler)."""
    columns = {
        row[0]
        for row in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'scores'"
        ).fetchall()
    }
    if not columns or "labeler" in columns:
        return
    con.execute("ALTER TABLE scores RENAME TO scores_v3")
    con.execute(SCHEMA["scores"])
    con.execute("""INSERT INTO scores
            (run_id, layer, feature, labeler, scorer, value, n, status, unreliable, details_json)
        SELECT s.run_id, s.layer, s.feature, coalesce(l.labeler, 'unknown'), s.scorer, s.value, s.n, s.status,
               s.unreliable, s.details_json
        FROM scores_v3 s LEFT JOIN (SELECT run_id, layer, feature, arg_max(labeler, created_at) AS labeler
                                    FROM labels WHERE status = 'ok' GROUP BY ALL) l USING (run_id, layer, feature)""")
    con.execute("DROP TABLE scores_v3")
