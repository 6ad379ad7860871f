"""Pipeline steps, one file per method; `llmlab.methods` lists them by the names used in pipeline YAML."""
