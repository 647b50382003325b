"""Where each question family fails, seen on the retrieval heads (TRAINING.md, "Where each family fails").

At the position that predicts the answer, heads 0-1 of layer 1 (the heads the recipe supervises):
the share of their attention on the question's target (its referents' patches; <s> for a "no" and,
with counted centres, for a count), the share on <s>, and whether their output alone, through
o_proj, the final norm and lm_head restricted to the answer words, names the answer.

    python -m harness.testbed.retrieval_probe [MODEL] [N]      # N validation questions per family
"""

from __future__ import annotations

import sys

import torch

from . import questions as Q
from . import train as T

FAMILIES = ("exist", "count", "color", "spatial", "text", "video")
LAYER = 1


@torch.no_grad()
def probe(model, processor, family: str, n: int, batch_size: int = 8) -> dict[str, float]:
    tok, image_id = processor.tokenizer, model.config.image_token_id
    answer_ids = torch.tensor(T.word_ids(tok, T.readout_words("all", counts=True)))
    samples = []
    for i in range(n):
        s = Q.make_sample("validation", family, i)
        samples.append({**s, "turns": [], "evidence_turns": [Q.referent_evidence(s)],
                        "centre_turns": [T.counted_centres(s, s["question"])]})
    target, sink, right = [], [], []
    for start in range(0, n, batch_size):
        batch = T.collate(samples[start:start + batch_size], tok, image_id, sink_for_absent=True)
        ev = batch.pop("evidence")
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
        logp = T.answer_attention(model, out.hidden_states, batch, ev["rows"], ev["positions"], LAYER)  # (N, 2, T)
        target.append(torch.logsumexp(logp.masked_fill(~ev["patches"], float("-inf")), -1).exp())
        sink.append(logp[:, :, 0].exp())
        logits = T.retrieval_logits(model, out.hidden_states, logp.exp(), ev["rows"], LAYER)[:, answer_ids]
        right.append(answer_ids[logits.argmax(-1)] == batch["labels"][ev["rows"], ev["positions"] + 1])
    target, sink, right = torch.cat(target), torch.cat(sink), torch.cat(right).float()
    return {"questions": len(right), "target_head0": float(target[:, 0].mean()), "target_head1": float(target[:, 1].mean()),
            "sink_head0": float(sink[:, 0].mean()), "readout_accuracy": float(right.mean())}


def main(argv: list[str]) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from .model import CHECKPOINT

    path = argv[0] if argv else str(CHECKPOINT)
    n = int(argv[1]) if len(argv) > 1 else 24
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    print("| family | mass on target (head 0 / 1) | mass on `<s>` | read-out accuracy |\n|---|---|---|---|")
    for family in FAMILIES:
        r = probe(model, processor, family, n)
        print(f"| {family} | {r['target_head0']:.2f} / {r['target_head1']:.2f} | {r['sink_head0']:.2f} | "
              f"{r['readout_accuracy']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
