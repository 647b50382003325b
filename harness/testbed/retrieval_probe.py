"""Where each question family fails, seen on the retrieval heads (TRAINING.md, "Where each family fails").

At the position that predicts the answer, heads 0-1 of layer 1 (the heads the recipe supervises):
the share of their attention on the question's target (its referents' patches; <s> for a "no" and,
with counted centres, for a count), the share on <s>, and whether their output alone, through
o_proj, the final norm and lm_head restricted to the answer words, names the answer.

Three more views of why existence failed (TRAINING.md, "Why existence stays at chance"): on
questions answered "yes", the heads' mean log-attention per patch of the target, of objects sharing
only its colour or only its shape, and of the rest (`match_logits`); whether the answer position
knows the colour and the shape asked about (`question_probe`); and how well the heads' keys can be
searched by colour, shape or letter at all: a free query per value, fitted on training scenes, and
the attention mass it puts on that value's patches in validation scenes (`key_retrieval`).

    python -m harness.testbed.retrieval_probe [MODEL] [N]      # N validation questions per family
"""

from __future__ import annotations

import sys

import torch

from . import questions as Q
from . import world as W
from .training.batches import attribute_targets, collate, word_ids
from .training.retrieval import answer_attention, attribute_log_mass, image_keys, readout_words, retrieval_logits
from .training.samples import counted_centres

FAMILIES = ("exist", "count", "color", "spatial", "text", "video")
LAYER = 1


@torch.no_grad()
def _forward(model, processor, samples: list[dict], sink_for_absent: bool = False):
    """One batch of single-turn questions through the model: the batch, its evidence and the outputs."""
    batch = collate(samples, processor.tokenizer, model.config.image_token_id, sink_for_absent=sink_for_absent)
    evidence = batch.pop("evidence")
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    return batch, evidence, out


def _question(sample: dict, **extra) -> dict:
    """A sample as the recipe's collate takes it: one turn, its referents' evidence."""
    return {**sample, "turns": [], "evidence_turns": [Q.referent_evidence(sample)], **extra}


@torch.no_grad()
def probe(model, processor, family: str, n: int, batch_size: int = 8) -> dict[str, float]:
    answer_ids = torch.tensor(word_ids(processor.tokenizer, readout_words("all", counts=True)))
    samples = [Q.make_sample("validation", family, i) for i in range(n)]
    samples = [_question(s, centre_turns=[counted_centres(s, s["question"])]) for s in samples]
    target, sink, right = [], [], []
    for start in range(0, n, batch_size):
        batch, ev, out = _forward(model, processor, samples[start:start + batch_size], sink_for_absent=True)
        logp = answer_attention(model, out.hidden_states, batch, ev["rows"], ev["positions"], LAYER)  # (N, 2, T)
        target.append(torch.logsumexp(logp.masked_fill(~ev["patches"], float("-inf")), -1).exp())
        sink.append(logp[:, :, 0].exp())
        logits = retrieval_logits(model, out.hidden_states, logp.exp(), ev["rows"], LAYER)[:, answer_ids]
        right.append(answer_ids[logits.argmax(-1)] == batch["labels"][ev["rows"], ev["positions"] + 1])
    target, sink, right = torch.cat(target), torch.cat(sink), torch.cat(right).float()
    return {"questions": len(right), "target_head0": float(target[:, 0].mean()), "target_head1": float(target[:, 1].mean()),
            "sink_head0": float(sink[:, 0].mean()), "readout_accuracy": float(right.mean())}


@torch.no_grad()
def match_logits(model, processor, n: int) -> dict[str, tuple[float, float]]:
    """Mean log-attention per patch of heads 0-1 (averaged per object, then over objects) on n
    validation existence questions answered "yes", by how the object matches the question."""
    groups = {"target": [], "colour only": [], "shape only": [], "neither": [], "<s>": []}
    index = 0
    while len(groups["<s>"]) < n:
        s = Q.make_sample("validation", "exist", index)
        index += 1
        if s["answer"] != "yes":
            continue
        colour, shape = s["question"].split()[3:5]
        batch, ev, out = _forward(model, processor, [_question(s)])
        logp = answer_attention(model, out.hidden_states, batch, ev["rows"], ev["positions"], LAYER)[0]
        image = (batch["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
        scene = s["scenes"][0]
        for i, obj in enumerate(scene["objects"]):
            same = (obj["color"] == colour, obj["name"] == shape)
            group = {(True, True): "target", (True, False): "colour only", (False, True): "shape only"}.get(same, "neither")
            groups[group].append(logp[:, image[W.evidence_patches(scene, [i])]].mean(-1))
        groups["<s>"].append(logp[:, 0])
    return {g: tuple(float(x) for x in torch.stack(v).mean(0)) for g, v in groups.items() if v}


def _image_keys(model, processor, split: str, n: int, batch_size: int = 8):
    samples = [_question(Q.make_sample(split, ("exist", "text")[i % 2], i)) for i in range(n)]  # text: letters
    keys, cos, sin, targets = [], [], [], []
    for start in range(0, n, batch_size):
        chunk = samples[start:start + batch_size]
        batch, _, out = _forward(model, processor, chunk)
        with torch.no_grad():
            parts = image_keys(model, out.hidden_states, batch, model.config.image_token_id, LAYER)
        for part, x in zip((keys, cos, sin), parts):
            part.append(x)
        targets.append(attribute_targets([s["scenes"][0] for s in chunk]))
    return [torch.cat(x) for x in (keys, cos, sin, targets)]


def key_retrieval(model, processor, n_fit: int = 160, n_eval: int = 48, steps: int = 300) -> dict[str, float]:
    """Mean attention mass (geometric, over validation images and the attributes they show) that a free
    query per colour / shape / letter puts on that attribute's patches, through the retrieval heads' keys."""
    scaling = model.model.language_model.layers[LAYER].self_attn.scaling
    fit, held = _image_keys(model, processor, "train", n_fit), _image_keys(model, processor, "validation", n_eval)
    queries = torch.zeros(fit[3].shape[1], fit[0].shape[-1], requires_grad=True)
    optimizer = torch.optim.Adam([queries], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        (-attribute_log_mass(*fit[:3], queries, fit[3], scaling)[fit[3].any(-1)].mean()).backward()
        optimizer.step()
    with torch.no_grad():
        mass = attribute_log_mass(*held[:3], queries, held[3], scaling)
    colours, shapes = len(W.COLOR_CLASSES) - 1, len(W.SHAPES)
    spans = {"colour": slice(0, colours), "shape": slice(colours, colours + shapes), "letter": slice(colours + shapes, None)}
    out = {}
    for name, span in spans.items():
        m = mass[:, span][held[3][:, span].any(-1)]
        out[name] = float(m.mean().exp()) if len(m) else float("nan")
    return out


def question_probe(model, processor, n_fit: int = 240, n_eval: int = 80, steps: int = 300) -> dict[str, float]:
    """Does the answer position know what an existence question asks? Validation accuracy of linear
    probes of the named colour and the named shape on layer 1's normalised input there (what heads
    0-1 form their queries from), fitted on training questions."""
    lm = model.model.language_model

    def states(split, n):
        xs, colours, shapes = [], [], []
        with torch.no_grad():
            for i in range(n):
                s = Q.make_sample(split, "exist", i)
                colour, shape = s["question"].split()[3:5]
                _, evidence, out = _forward(model, processor, [_question(s)])
                position = int(evidence["positions"][0])
                xs.append(lm.layers[LAYER].input_layernorm(out.hidden_states[LAYER])[0, position])
                colours.append(W.COLOR_NAMES.index(colour))
                shapes.append(W.SHAPES.index(shape))
        return torch.stack(xs).float(), torch.tensor(colours), torch.tensor(shapes)

    (x, *fit), (x_eval, *held) = states("train", n_fit), states("validation", n_eval)
    out = {}
    for name, y, y_eval, classes in (("colour", fit[0], held[0], len(W.COLOR_NAMES)),
                                     ("shape", fit[1], held[1], len(W.SHAPES))):
        probe = torch.nn.Linear(x.shape[1], classes)
        optimizer = torch.optim.Adam(probe.parameters(), lr=0.01, weight_decay=1e-3)
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(probe(x), y).backward()
            optimizer.step()
        with torch.no_grad():
            out[name] = float((probe(x_eval).argmax(-1) == y_eval).float().mean())
    return out


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
    print("\nExistence questions answered yes: mean log-attention per patch (head 0 / 1)\n\n| object | head 0 | head 1 |\n|---|---|---|")
    for group, (h0, h1) in match_logits(model, processor, n).items():
        print(f"| {group} | {h0:.2f} | {h1:.2f} |")
    r = question_probe(model, processor)
    print("\nWhat the answer position knows (linear probe of the question's colour / shape at layer 1's input)\n")
    print(f"| colour | shape |\n|---|---|\n| {r['colour']:.2f} | {r['shape']:.2f} |")
    r = key_retrieval(model, processor)
    print("\nKeys searched by one attribute (free query per value; mass on its patches, validation scenes)\n")
    print("| colour | shape | letter |\n|---|---|---|\n" + f"| {r['colour']:.2f} | {r['shape']:.2f} | {r['letter']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
