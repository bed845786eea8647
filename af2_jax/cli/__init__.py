"""The command-line shells: one module per command (`infer`, `convert`, `train`, `plan`, `audio`), each a parser and a
short `main` over the library, sharing `common` for logging, the accelerator warning and the exit-code table. They
run as `python -m af2_jax.<command>` (through the shim modules) or as the `af2-<command>` console scripts."""
