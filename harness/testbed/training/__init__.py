"""Training of the testbed model, in LLaVA's spirit: tower, alignment, then instructions.

Stage 1 (`vision`): the ViT alone, on dense per-patch ground truth from the world (each patch's
  object kind and colour, object centres, grid position) plus a [CLS] head predicting which kinds and
  colours the image holds, read at the penultimate layer that LLaVA uses. Features stay local, so
  pruning a question's evidence patches really removes the evidence.
Stage 2 (`align`): tower frozen; the projector learns to map each patch into the word-embedding space
  of the words that describe it (kind and colour), the analogue of LLaVA's caption alignment.
Stage 3 (`instruct`): tower frozen; projector and decoder on the question families, answer tokens only.

Every batch is a function of (stage, step), so a run killed at any moment resumes from its last
checkpoint to the same result. bf16 autocast on CPU (AMX) or GPU; weights stay fp32.

Modules: `recipe` (the Recipe and its YAML file), `samples` (what each step draws), `batches` (those
draws as tensors and targets), `losses` (stages 1-2, grid position), `retrieval` (the retrieval heads'
attention, read-out and losses), `evaluation`, `trainer` (the loop, checkpoints, resuming, export).
"""
