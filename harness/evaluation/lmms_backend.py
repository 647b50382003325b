"""lmms-eval model backend for Hugging Face multimodal checkpoints of every family the harness takes
(``harness.evaluation.model_args.MODEL_CLASSES``: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision),
from a local folder or a model id in the local Hugging Face cache.

Registered as ``vtp_llava`` (alias ``vtp``) through the ``lmms_eval.models`` entry point
(``harness.evaluation.lmms_plugin``), so

    lmms-eval eval --model vtp_llava --model_args pretrained=PATH,method=none --tasks ... --include_path tasks

works, and ``harness run`` passes an instance to ``simple_evaluate`` (the model is loaded once and
reconfigured per method/budget with :meth:`VTPLlava.configure`).

Protocol: "simple" (``is_simple = True``), so ``multiple_choice`` tasks work. Requests carry a
``doc_id``; visuals come from ``doc_to_visual(self.task_dict[task][split][doc_id])``: images, and for the
families that take them (Qwen2-VL, Qwen2.5-VL, OneVision) videos as lists of frames or video files, decoded
with PyAV into ``video_frames`` frames (model_arg, default 8; harness.evaluation.inputs).

* ``generate_until``: greedy, batched (``batch_size``) with left padding; honours ``max_new_tokens``
  and ``until`` (the text is cut at the first stop string). Returns ``GenerationResult`` with token
  counts.
* ``loglikelihood``: ``(loss, is_greedy)`` with loss = the summed NLL of the continuation tokens.
  lmms-eval's convention: a *loss*, and multiple choice picks the ``argmin``.
* Per request, keyed by ``(task, doc_id, idx)``, :attr:`VTPLlava.records` keeps what the
  consistency metrics need: generated token ids, the first answer token's log-probs (the whole
  vocabulary when it has at most ``FULL_VOCAB_LIMIT`` entries, else the top ``top_k_logprobs``) and
  the number of visual tokens in and kept.

Response cache (lmms-eval ``--use_cache``): its key hashes ``f"{model}|{model_args}"``. For string
models ``method=``/``budget=`` are part of ``model_args``; for an instance ``str(instance)`` spells
them out (see ``__str__``). So a cached answer is never served to another method or budget.
``harness run`` does not enable the cache at all.
"""

from __future__ import annotations

from . import lmms_compat  # first: offline variables, before transformers/datasets are imported

lmms_compat.apply(restore_log=False)

import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from lmms_eval.api.instance import GenerationResult, TokenCounts  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from loguru import logger  # noqa: E402
from tqdm import tqdm  # noqa: E402

import methods  # noqa: E402
from harness.adapters import NonFiniteFeatures, prune  # noqa: E402
from harness.budget import DEFAULT_BUDGET_SCOPE, budget_label, check_budget, check_scope, for_method  # noqa: E402
from harness.budget import parse_budget  # noqa: E402

from . import vision_cache  # noqa: E402
from .image_cache import CachedImageProcessor, LRUBytes  # noqa: E402
from .inputs import DEFAULT_VIDEO_FRAMES, Inputs, doc_label, is_video, parse_video_frames, stop_at  # noqa: E402
from .model_args import CheckpointError, check_pretrained  # noqa: E402,F401
from .model_args import parse_batch_size, resolve_device, resolve_dtype  # noqa: E402
from .scoring import Scoring  # noqa: E402

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "num_beams", "do_sample")


class VTPLlava(Inputs, Scoring, lmms):
    """LLaVA (``LlavaForConditionalGeneration``) under a visual-token pruning method."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, device: str | None = "cpu", dtype=None, batch_size=1,
                 method: str = "none", budget=None, max_new_tokens: int = 32, top_k_logprobs: int = 20,
                 image_cache_mb: int = 1536, vision_cache_mb: int = 1024, budget_scope: str = DEFAULT_BUDGET_SCOPE,
                 video_frames=DEFAULT_VIDEO_FRAMES, **kwargs) -> None:
        super().__init__()
        # The evaluator always passes batch_size/max_batch_size/device (the latter two possibly
        # None-filtered); anything else is a typo worth a warning, not a crash.
        kwargs.pop("max_batch_size", None)
        # Anything else is a parameter of the method (`method=fastv,layer=2`); methods.get rejects
        # a name the method does not have, listing the ones it accepts.
        self.method_params = kwargs
        self.budget_scope = check_scope(budget_scope)  # an image of several parts: split the budget, or per part
        self.pretrained = check_pretrained(pretrained)
        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        self.batch_size_per_gpu = parse_batch_size(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.top_k_logprobs = int(top_k_logprobs)
        self.video_frames = parse_video_frames(video_frames)  # frames sampled from a video file (inputs.py)

        # The family is the config's model_type (check_pretrained accepted it): its transformers class, and
        # its processor through the harness's one loader (stand-ins where transformers lacks torchvision).
        from harness.adapters.processing import load_processor

        from .model_args import model_class, model_type_of

        self.model_type = model_type_of(self.pretrained)
        self._processor = load_processor(self.pretrained)
        # The documents' images and pixels, kept across cells (harness.evaluation.image_cache): a quarter of
        # the budget for the images, the rest for their pixel tensors.
        cache_bytes = max(0, int(image_cache_mb)) * 2 ** 20
        self._visual_cache = LRUBytes(cache_bytes // 4)
        if cache_bytes and hasattr(self._processor, "image_processor"):
            self._processor.image_processor = CachedImageProcessor(self._processor.image_processor,
                                                                   cache_bytes - cache_bytes // 4)
        # Vision-encoder outputs, kept across cells for the evaluation forwards (harness.evaluation.vision_cache)
        self._vision_cache = vision_cache.from_megabytes(vision_cache_mb)
        self._model = model_class(self.model_type).from_pretrained(self.pretrained, dtype=self._dtype)
        self._model.to(self._device).eval()
        config = self._model.config
        self.image_token_id = getattr(config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = config.image_token_index
        self.image_token = getattr(self._processor, "image_token", "<image>")
        # the video placeholder and its id: None for the image-only families (Inputs.takes_video)
        self.video_token = getattr(self._processor, "video_token", None)
        self.video_token_id = getattr(config, "video_token_id", None)
        tok = self.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos_token_id = tok.eos_token_id
        self.records: dict[tuple, dict] = {}
        #: (task, doc_id, idx) -> the unpruned model's generated ids; when set (harness run sets it
        #: after the reference cell), generation also records `teacher_forced_nll`: the summed NLL of
        #: the unpruned answer under the current method.
        self.reference_answers: dict[tuple, list[int]] = {}
        #: per task, the prompt and visuals of its first request: the input the FLOPs are counted on
        self.example_prompts: dict[str, tuple] = {}
        #: (task, tokens entering each decoder layer) -> the counted operations of that layout (`flops`)
        self._flops_by_layout: dict[tuple, dict] = {}
        self._warned_sampling = False
        self.configure(method, budget)

    # ------------------------------------------------------------------ configuration

    def configure(self, method="none", budget=None) -> None:
        """Switch to ``method`` (a registered name or a method instance) at ``budget``.

        The budget is dropped for methods that take none (``none``), so the unpruned cell is
        one cell whatever ``--budgets`` says.
        """
        self.method = methods.get(method, **self.method_params) if isinstance(method, str) else method
        self.budget = for_method(self.method, check_budget(parse_budget(budget), self.tokens_per_image))

    def check_method(self, method) -> None:
        """A one-line ValueError when `method` cannot run on this model (harness.adapters: the method's own
        check, then what it needs that the model's family lacks)."""
        self._adapter.check(method, self._model.config)

    @property
    def tokens_per_image(self) -> int | None:
        """Visual tokens of one image: the largest integer budget this model takes; None where the count
        varies per image (LLaVA-NeXT's crops, Qwen's dynamic resolution: a count is capped per image)."""
        return self._adapter.tokens_per_image(self._model.config)

    @property
    def method_name(self) -> str:
        return getattr(self.method, "name", type(self.method).__name__)

    @property
    def _budget_label(self) -> str:
        return budget_label(self.budget, getattr(self.method, "adaptive", False))

    def __str__(self) -> str:
        # Part of the response-cache key (``f"{model}|{model_args}"``): it must name everything
        # that changes outputs, and no object address, so cached entries match across processes.
        frames = f", video_frames={self.video_frames}" if self.takes_video else ""  # it changes video inputs
        return (f"vtp_llava(pretrained={self.pretrained}, method={self.method!r}, budget={self.budget}, "
                f"budget_scope={self.budget_scope}{frames})")

    __repr__ = __str__

    @contextlib.contextmanager
    def _pruning_applied(self, record_ipr: bool = True):
        """The method's hooks around one batch (the model family's adapter); None for the unpruned model,
        which runs without any hook."""
        if isinstance(self.method, methods.NoPruning):
            yield None
            return
        with prune(self._model, self.method, self.budget, record_ipr=record_ipr, budget_scope=self.budget_scope) as run:
            yield run

    def _measuring(self):
        return self._pruning_applied(record_ipr=False)

    @staticmethod
    @contextlib.contextmanager
    def _naming_documents(visuals: list[list], labels: list[str]):
        """A NonFiniteFeatures error inside names the document its image or video came from (`visuals`: each
        row's visuals, images and videos in the order the adapter numbers them; `labels`: each row's document)."""
        try:
            yield
        except NonFiniteFeatures as err:
            first = 0
            for row, label in zip(visuals, labels):
                if err.image < first + len(row):
                    i = err.image - first
                    what = f"visual {i} of the document (a video)" if is_video(row[i]) else \
                        f"image {i} of the document"
                    raise err.at(f"{label}, {what}") from None
                first += len(row)
            raise


    # ------------------------------------------------------------------ lmms interface

    @property
    def model(self):
        return self._model

    @property
    def processor(self):
        return self._processor

    @property
    def tokenizer(self):
        return self._processor.tokenizer

    @property
    def device(self):
        return torch.device(self._device)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def clean(self) -> None:
        """Keep the model. lmms-eval 0.7.3 calls ``clean()`` after inference and the base class
        deletes every ``nn.Module`` attribute, which would break the next evaluation on this
        instance (``harness run`` reuses one instance for every method and budget)."""
        gc.collect()
        if self._device.startswith("cuda"):
            torch.cuda.empty_cache()

    def flops(self, task: str) -> dict[str, int]:
        """Operation counts of the current method and budget on the task's first prompt (the
        generation prompt; see harness.metrics.flops): counted (fvcore, or torch's counter where fvcore
        cannot trace the family) and the analytic prefill.

        The counts depend only on the tokens entering each decoder layer, unless the method's own work is
        counted too: an in-LLM method's (its hooks run inside the decoder) or one that calls model modules while
        it chooses (`PruningRun.selection_module_calls`). Otherwise cells with one layout share one count
        (`_flops_by_layout`): in a sweep the pre-LLM methods at a budget all keep the same number of tokens."""
        from harness.metrics import flops

        prompt, visuals = self.example_prompts[task]
        inputs = self._encode([prompt], [visuals])
        family = self._adapter
        with self._naming_documents([visuals], [f"task {task}'s first prompt (operation count)"]):
            runs = []

            @contextlib.contextmanager
            def measuring():
                with self._measuring() as run:
                    runs.append(run)
                    yield run

            per_layer = flops.tokens_per_layer(self._model, inputs, measuring)
            own_work = runs[0] is not None and (self.method.stage != "pre_llm" or runs[0].selection_module_calls > 0)
            layout = (task, tuple(per_layer))
            counts = None if own_work else self._flops_by_layout.get(layout)
            if counts is None:
                counts = flops.count_forward(self._model, inputs, self._measuring, vision_module=family.vision_module,
                                             projector_module=family.projector_module)
                counts.pop("torch_comparable")
                if not own_work:
                    self._flops_by_layout[layout] = counts
        counts = dict(counts)
        counts["flops_prefill_analytic"] = flops.prefill_analytic(self._model.config.text_config, per_layer)
        visual = sum(family.visual_tokens_per_row(self._model, inputs))
        counts["equivalent_tokens"] = flops.equivalent_tokens(  # per image or video frame: what a budget applies to
            per_layer, inputs["input_ids"].shape[1], visual_tokens=visual, images=self._budget_units(visuals, inputs))
        return counts

    def timings(self, task: str, repeats: int = 5) -> dict:
        """The timing pass (harness.metrics.timing) of the current method and budget on the task's first prompt."""
        from harness.metrics.timing import time_cell

        prompt, visuals = self.example_prompts[task]
        with self._naming_documents([visuals], [f"task {task}'s first prompt (timing pass)"]):
            return time_cell(self._model, self._encode([prompt], [visuals]), self._measuring, repeats=repeats)

    def pop_records(self) -> dict[tuple, dict]:
        """The per-request records so far, and start afresh."""
        records, self.records = self.records, {}
        return records

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vtp_llava does not support generate_until_multi_round (multi-round tasks); "
                                  "use generate_until or multiple_choice tasks")

    # ------------------------------------------------------------------ inputs


    def _key(self, req) -> tuple:
        return (req.task_name, req.doc_id, req.idx)

    def _record_base(self, req, request_type: str) -> dict:
        return {"request_type": request_type, "method": repr(self.method), "budget": self.budget,
                "budget_scope": self.budget_scope}


    # ------------------------------------------------------------------ generation

    def _gen_settings(self, gen_kwargs: dict) -> tuple[int, list]:
        gen_kwargs = dict(gen_kwargs or {})
        sampling = {k: gen_kwargs[k] for k in SAMPLING_KEYS if k in gen_kwargs}
        wants_sampling = bool(sampling.get("do_sample")) or float(sampling.get("temperature") or 0) > 0 \
            or int(sampling.get("num_beams") or 1) > 1
        if wants_sampling and not self._warned_sampling:
            logger.warning(f"vtp_llava decodes greedily; ignoring {sampling}")
            self._warned_sampling = True
        max_new = gen_kwargs.get("max_new_tokens")
        return int(max_new) if max_new is not None else self.max_new_tokens, gen_kwargs.get("until") or []

    def generate_until(self, requests) -> list:
        results: list = [None] * len(requests)
        # Group by generation settings (tasks differ), longest inputs first, then batch.
        groups: dict[str, list[int]] = {}
        prepared = []
        for i, req in enumerate(requests):
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args[:6]
            visuals = self._visuals(doc_to_visual, doc_id, task, split)  # images, and videos as frame lists
            prepared.append((self.build_prompt(ctx, visuals), visuals, gen_kwargs))
            self.example_prompts.setdefault(task, prepared[-1][:2])
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        with tqdm(total=len(requests), desc=f"generate [{self.method_name}, budget {self._budget_label}]",
                  disable=self.rank != 0, leave=False) as bar:  # closed (cleared) on an error too
            for indices in groups.values():
                indices.sort(key=lambda i: (-len(prepared[i][1]), -len(prepared[i][0])))
                max_new, until = self._gen_settings(prepared[indices[0]][2])
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start:start + self.batch_size]
                    for i, result in zip(chunk, self._generate_batch([prepared[i] for i in chunk],
                                                                     [requests[i] for i in chunk], max_new, until)):
                        results[i] = result
                    bar.update(len(chunk))
        return results

    def _generate_batch(self, items, reqs, max_new_tokens: int, until) -> list:
        with self._naming_documents([ims for _, ims, _ in items], [doc_label(r) for r in reqs]):
            return self._generate_batch_unnamed(items, reqs, max_new_tokens, until)

    @torch.inference_mode()
    def _generate_batch_unnamed(self, items, reqs, max_new_tokens: int, until) -> list:
        inputs = self._encode([p for p, _, _ in items], [ims for _, ims, _ in items], padding_side="left")
        n_in = inputs["input_ids"].shape[1]
        visual_in = self._visual_counts(inputs)
        with self._pruning_applied() as run, self._vision_caching():
            out = self._model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                       temperature=None, top_p=None, top_k=None,
                                       pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
                                       return_dict_in_generate=True, output_logits=True)
        sequences = out.sequences[:, n_in:].tolist()
        first_logits = out.logits[0] if out.logits else None
        kept, delta_ipr = self._per_row(run, visual_in)
        teacher_nll = self._teacher_forced_nll(items, [self.reference_answers.get(self._key(r)) for r in reqs],
                                               sequences, out.logits)
        prompt_lengths = inputs["attention_mask"].sum(-1).tolist()
        results = []
        for row, (ids, req) in enumerate(zip(sequences, reqs)):
            if self.eos_token_id in ids:
                ids = ids[:ids.index(self.eos_token_id)]
            while ids and ids[-1] == self.pad_token_id:
                ids.pop()
            raw = self.tokenizer.decode(ids, skip_special_tokens=True)
            text = stop_at(raw, until)
            record = self._record_base(req, "generate_until")
            record.update(generated_ids=ids, raw_text=raw, text=text,
                          first_token=self._first_token_dist(first_logits[row]) if first_logits is not None else None,
                          input_tokens=int(prompt_lengths[row]),
                          visual_tokens_in=int(visual_in[row]),
                          visual_tokens_kept=sum(len(k) for k in kept[row]), kept_indices=kept[row],
                          evidence_recall=self._evidence_recall(req, kept[row]), delta_ipr=delta_ipr[row],
                          teacher_forced_nll=teacher_nll[row])
            self.records[self._key(req)] = record
            results.append(GenerationResult(text=text, token_counts=TokenCounts(
                input_tokens=int(prompt_lengths[row]), output_tokens=len(ids))))
        return results


    # ------------------------------------------------------------------ loglikelihood

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Requests that share a doc and prompt and whose continuations are single tokens (the
        options of a multiple-choice question) are scored from one forward: with causal attention
        the prompt's last position does not see the continuation, so this equals scoring each alone
        (tested), at a quarter of the cost for four options."""
        results: list = [None] * len(requests)
        groups: dict[tuple, list] = {}
        for i, req in enumerate(requests):
            ctx, continuation, doc_to_visual, doc_id, task, split = req.args[:6]
            images = self._visuals(doc_to_visual, doc_id, task, split)  # images, and videos as frame lists
            if callable(continuation):  # output_type: loglikelihood passes doc_to_target
                continuation = continuation(self.task_dict[task][split][doc_id])
            prompt = self.build_prompt(ctx, images)
            self.example_prompts.setdefault(task, (prompt, images))
            ids = self.tokenizer(str(continuation), add_special_tokens=False)["input_ids"]
            groups.setdefault((task, split, doc_id, prompt), [prompt, images, []])[2].append(
                (i, str(continuation), ids))
        items = []
        for prompt, images, options in groups.values():
            if len(options) > 1 and all(len(ids) == 1 for _, _, ids in options):
                items.append((prompt, images, options))
            else:
                items += [(prompt, images, [option]) for option in options]
        items.sort(key=lambda it: (-len(it[1]), -len(it[0])))
        with tqdm(total=len(requests), desc=f"loglikelihood [{self.method_name}, budget {self._budget_label}]",
                  disable=self.rank != 0, leave=False) as bar:  # closed (cleared) on an error too
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                for (i, _, _), result in zip([o for it in chunk for o in it[2]],
                                             self._loglikelihood_batch(chunk, requests)):
                    results[i] = result
                bar.update(sum(len(it[2]) for it in chunk))
        return results

    @torch.inference_mode()
    def _loglikelihood_batch(self, items, requests) -> list[tuple[float, bool]]:
        """One forward for the batch's prompts; each item's options in order. An item holds one
        continuation, or several single-token ones read at the same position."""
        with self._naming_documents([ims for _, ims, _ in items],
                                    [doc_label(requests[options[0][0]]) for _, _, options in items]):
            scored, run_info = self._score_continuations([(p, ims) for p, ims, _ in items],
                                                         [options[0][2] for _, _, options in items])
        results = []
        for row, ((loss, greedy, first, logprobs), (_, _, options)) in enumerate(zip(scored, items)):
            kept = run_info["kept"][row]
            for i, continuation, ids in options:
                if len(options) > 1:  # a single-token option of a shared prompt
                    loss, greedy = float(-logprobs[ids[0]]), bool(int(logprobs.argmax()) == ids[0])
                req = requests[i]
                record = self._record_base(req, "loglikelihood")
                record.update(continuation=continuation, continuation_ids=ids,
                              input_tokens=int(run_info["prompt_lengths"][row]),
                              visual_tokens_in=int(run_info["visual_in"][row]),
                              visual_tokens_kept=sum(len(k) for k in kept), kept_indices=kept,
                              evidence_recall=self._evidence_recall(req, kept), delta_ipr=run_info["delta_ipr"][row],
                              loss=loss, is_greedy=greedy, first_token=first)
                self.records[self._key(req)] = record
                results.append((loss, greedy))
        return results

