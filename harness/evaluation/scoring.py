"""What the backend measures per request besides the answer: the first answer token's distribution, kept
tokens and ΔIPR per row, evidence recall, and the summed NLL of a continuation (multiple choice options,
and the unpruned answer under the pruned model)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

FULL_VOCAB_LIMIT = 1024  # store the whole first-token distribution for vocabularies this small


class Scoring:
    """The scoring half of `VTPLlava` (harness.evaluation.lmms_backend), which mixes it in."""

    def _first_token_dist(self, logits: torch.Tensor) -> dict:
        logprobs = F.log_softmax(logits.float(), dim=-1)
        vocab = logprobs.shape[-1]
        k = vocab if vocab <= FULL_VOCAB_LIMIT else min(self.top_k_logprobs, vocab)
        values, ids = logprobs.topk(k)
        return {"ids": ids.tolist(), "logprobs": values.tolist(), "full": k == vocab}

    @property
    def _adapter(self):
        """The model family's pruning run class (harness.adapters): what it counts as visual tokens."""
        from harness.adapters import adapter_for

        return adapter_for(self._model).PruningRun

    def _vision_caching(self):
        """Vision-encoder outputs served from the backend's cache (harness.evaluation.vision_cache) for the block:
        around the evaluation forwards only, never the FLOPs count or the timing pass."""
        cache = getattr(self, "_vision_cache", None)
        if cache is None:
            return contextlib.nullcontext()
        return cache.active(self._model, self._adapter.vision_hooked_modules(self._model))

    def _visual_counts(self, inputs) -> list[int]:
        """Per row, the prunable visual tokens the unpruned model reads."""
        return self._adapter.visual_tokens_per_row(self._model, inputs)

    def _per_row(self, run, counts: list[int]) -> tuple[list[list[list[int]]], list[float | None]]:
        """Per row (`counts`: its visual tokens in, `_visual_counts`): its images' kept indices, and their mean
        ΔIPR (everything kept and ΔIPR 0 for the unpruned model: one list per image where every image has the
        same count, else one per row)."""
        rows = len(counts)
        if run is None:
            per_image = self._adapter.tokens_per_image(self._model.config)
            images = [(row, list(range(per_image if per_image else n)), 0.0)
                      for row, n in enumerate(counts) for _ in range(n // per_image if per_image else int(n > 0))]
        else:
            images = [(r.row, r.kept.tolist(), r.extra.get("delta_ipr")) for r in run.images]
        kept: list[list[list[int]]] = [[] for _ in range(rows)]
        values: list[list[float]] = [[] for _ in range(rows)]
        for row, indices, value in images:
            kept[row].append(indices)
            if value is not None:
                values[row].append(value)
        return kept, [sum(v) / len(v) if v else None for v in values]

    def _evidence_recall(self, req, kept: list[list[int]]) -> float | None:
        """Share of the doc's evidence that the method kept, for tasks that say where it is: their
        metadata's `doc_to_evidence(doc)` gives (image, visual token) pairs (the testbed's tasks do);
        None for other tasks and for docs without evidence."""
        evidence_of = (req.metadata or {}).get("doc_to_evidence")
        # Evidence is (image, token) on a fixed raster per image: none where token counts vary per image.
        if not callable(evidence_of) or not self._adapter.tokens_per_image(self._model.config):
            return None
        _, _, _, doc_id, task, split = req.args[:6]
        evidence = evidence_of(self.task_dict[task][split][doc_id])
        if not evidence:
            return None
        kept_pairs = {(i, k) for i, image in enumerate(kept) for k in image}
        return sum((int(i), int(p)) in kept_pairs for i, p in evidence) / len(evidence)

    def _teacher_forced_nll(self, items, reference, steps, step_logits) -> list[float | None]:
        """Per row, the summed NLL of its reference answer (the unpruned model's generated ids) under
        the current method; None without one. Where the greedy answer just generated (`steps`: its
        tokens, `step_logits`: generate's logits per step) follows the reference up to its last token,
        generate's step logits are the teacher-forced ones (same prompt, same pruned cache, same
        prefix), so they are read there; only the other rows are run again, teacher-forced."""
        nll: list[float | None] = [None] * len(items)
        rerun = []
        for row, ref in enumerate(reference):
            if not ref:
                continue
            if len(ref) <= len(step_logits) and steps[row][:len(ref) - 1] == ref[:-1]:
                logprobs = torch.stack([step_logits[j][row] for j in range(len(ref))]).float().log_softmax(-1)
                nll[row] = float(-logprobs.gather(-1, torch.tensor(ref, device=logprobs.device)[:, None]).sum())
            else:
                rerun.append(row)
        if rerun:
            scored, _ = self._score_continuations([items[i][:2] for i in rerun], [reference[i] for i in rerun])
            for row, (loss, *_) in zip(rerun, scored):
                nll[row] = loss
        return nll

    @torch.inference_mode()
    def _score_continuations(self, prompts, conts: list[list[int]]):
        """Per continuation after its prompt, under the current method, from one teacher-forced
        forward for the batch: summed NLL, whether greedy, the first token's distribution (as
        stored) and its full log-probability vector."""
        # Right padding: trailing pads cannot affect earlier (causal) positions; positions come from
        # the mask, so they are exact per row whatever the padding, also after pruning re-pads rows.
        inputs = self._encode([p for p, _ in prompts], [ims for _, ims in prompts], padding_side="right")
        prompt_lengths = inputs["attention_mask"].sum(-1).tolist()
        total = max(p + len(c) for p, c in zip(prompt_lengths, conts))
        input_ids = torch.full((len(prompts), total), self.pad_token_id, dtype=torch.long, device=self._device)
        attention = torch.zeros((len(prompts), total), dtype=torch.long, device=self._device)
        for row, (p, c) in enumerate(zip(prompt_lengths, conts)):
            input_ids[row, :p] = inputs["input_ids"][row, :p]
            input_ids[row, p:p + len(c)] = torch.tensor(c, dtype=torch.long, device=self._device)
            attention[row, :p + len(c)] = 1
        model_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        if self._adapter.gathers_positions:  # M-RoPE: the model numbers from the token types; the continuation is text
            types = torch.zeros_like(input_ids)
            types[:, :inputs["input_ids"].shape[1]] = model_inputs["mm_token_type_ids"]
            model_inputs["mm_token_type_ids"] = types
        else:
            model_inputs["position_ids"] = (attention.cumsum(-1) - 1).clamp(min=0)
        with self._pruning_applied() as run, self._vision_caching():
            if run is not None:  # in-LLM methods score from the last prompt token, not the continuation
                run.query_positions = torch.tensor(prompt_lengths, device=self._device) - 1
            logits = self._model(input_ids=input_ids, attention_mask=attention, **model_inputs).logits
            columns = run.columns() if run is not None else None  # original column of each output position
        visual_in = self._visual_counts(inputs)
        kept, delta_ipr = self._per_row(run, visual_in)
        info = {"prompt_lengths": prompt_lengths, "visual_in": visual_in,
                "kept": kept, "delta_ipr": delta_ipr}
        scored = []
        for row, (p, c) in enumerate(zip(prompt_lengths, conts)):
            if not c:
                scored.append((0.0, True, None, None))
                continue
            at = torch.arange(p - 1, p - 1 + len(c), device=logits.device)
            if columns is not None:  # where those positions went in the pruned sequence
                at = (columns[row][None, :] == at[:, None]).float().argmax(-1)
            logprobs = F.log_softmax(logits[row, at].float(), dim=-1)
            target = torch.tensor(c, device=logprobs.device)
            scored.append((float(-logprobs.gather(-1, target[:, None]).sum()),
                           bool((logprobs.argmax(-1) == target).all()), self._first_token_dist(logits[row, at[0]]),
                           logprobs[0]))
        return scored, info
