"""Synthetic training data: documents an instruct model writes about a Model Spec (`refinery synth spec`).

Here, not in `training` or `curation`, because a run needs both: the LLM client and sampler of
`training` to generate, and the MinHash, document and corpus layout of `curation` to write a corpus
(`pipelines` is the one package that may import both). Modules: `spec` (markdown → sections and
principles), `prompts` (document-type templates × sections), `quality` (drops and near-duplicates),
`run` (batched, resumable generation → corpus), `cli` (the subcommand).
"""
