"""The training recipe: every setting of a run, and its YAML file (`harness testbed train --recipe`).

A recipe file names Recipe fields (the rest keep their defaults); `load` refuses anything else before
any training. The shipped model's recipe is harness/testbed/checkpoint/recipe.yaml.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from harness.errors import InputError

from .. import model as M

READOUT_ANSWERS = ("attributes", "all")  # what `Recipe.readout_answers` may say


@dataclass
class Recipe:
    seed: int = 0
    vision_steps: int = 900
    vision_batch: int = 32
    vision_lr: float = 3e-3
    align_steps: int = 80
    align_batch: int = 32
    align_lr: float = 3e-3
    instruct_steps: int = 900
    instruct_lr: float = 1.5e-3
    single_batch: int = 32
    multi_batch: int = 8
    video_batch: int = 4
    # Of every `cycle` instruction steps, which are multi-image and video ones (the rest single-image).
    cycle: int = 6
    multi_slots: tuple = (2,)
    video_slots: tuple = (5,)
    turns: int = 8  # questions per training conversation
    # Single-image scenes start reduced to 1, 2, ... objects, whole after `curriculum_steps`.
    curriculum_steps: int = 300
    curriculum_max_objects: int = 6
    warmup: int = 30
    # Attention supervision: in `attention_layer`, heads 0 and 1 at each answer's position are taught
    # to look at the evidence of the question's first and last referent (the same one unless the
    # question names two). Retrieval over 576 tokens otherwise forms very slowly (TRAINING.md).
    attention_weight: float = 0.5
    attention_layer: int = 1
    # Deep supervision of those heads' read-out: for questions whose answer is an attribute of the
    # looked-at object (a colour or a letter), heads 0-1's output alone, through the model's own
    # o_proj, final norm and lm_head, should name the answer. Without it the retrieval heads look at
    # the right patches but their values carry no colour for hundreds of steps (TRAINING.md).
    readout_weight: float = 0.0
    # Which answers the read-out loss covers: "attributes" (colours, letters) or "all" (also yes/no
    # and the four relations). Counts are read out only with `count_centres`, which makes them a
    # function of what the two heads look at.
    readout_answers: str = "attributes"
    # For a "no" (nothing in the images is what the question names), heads 0-1 look at the <s>
    # token instead of the partial matches: a clean signal that the read-out can tell from an object.
    sink_for_absent: bool = False
    # Keep each image token's grid position linearly readable from the projector output during
    # instruction tuning (the alignment stage's position loss, kept on): the answer loss alone let the
    # projector drop it (position R^2 0.91 in the tower's features, ~0 after the projector; TRAINING.md),
    # and a spatial relation cannot be read from values that carry no position.
    position_weight: float = 0.0
    # For a count question, heads 0-1 spread their attention evenly over <s> and the centre patch of
    # each counted object, and the read-out covers counts: <s>'s share, 1/(n+1), then says n. With
    # the default target (every patch of every counted object) the heads find the objects (0.96 of
    # their mass) but a weighted mean of their values cannot say how many there are (TRAINING.md).
    count_centres: bool = False
    # With `count_centres`, the count target per object instead of per centre patch: <s> and each counted
    # object (all its patches together) take 1/(n+1) of the heads' mass, however it is spread within an
    # object. The centre target left 25-60% of the mass on the counted objects' other patches, more on
    # bigger objects, so <s>'s share tracked area as much as n (TRAINING.md).
    count_objects: bool = False
    # Keep each image token's grid position linearly readable from the retrieval heads' value vectors
    # (layer `attention_layer`, key/value head 0): RoPE puts position into queries and keys only, and
    # the answer loss did not carry it into the values, so the heads' outputs could not say where the
    # objects they found are (spatial relations at chance with 0.6-0.7 of the attention on them).
    value_position_weight: float = 0.0
    # Keep each colour and each kind retrievable from the retrieval heads' keys: a free query per
    # colour (and per kind), rotated as from just after the images, should put its attention on that
    # colour's (kind's) patches. The shipped keys retrieve a shape with 0.95 of the mass but a colour
    # with 0.51, so "a red circle" matched shape only and existence stayed at chance (TRAINING.md).
    key_attribute_weight: float = 0.0
    # Layer 0's heads 2-3 spread their attention evenly over the words naming a referent ("red",
    # "circle") instead of merely putting it on them: with the mass target alone they took only the
    # shape word, so the answer position never learned the colour asked about (a linear probe of it
    # there: 7.5%, chance 12.5%; of the shape: 100%) and "a red circle" was searched as "a circle".
    spread_words: bool = False
    # A llava-hf checkpoint whose every weight is taken (stages 1-2 skipped): instruction tuning
    # continues from it.
    init_from: str | None = None
    # With `init_from`: first continue its vision tower for this many stage-1 steps (then instruction
    # tuning, alignment skipped). The tower read letters poorly (30% per object) because letters were
    # 2.8% of its foreground patches; these three fields are how a continuation reads them better.
    tower_steps: int = 0
    tower_lr: float = 1e-3
    # Share of each stage-1 batch drawn as reading scenes (4-8 letters at the text task's sizes and
    # small shapes) instead of the question families' scenes.
    letter_scenes: float = 0.0
    # Weight of a second kind loss over letter patches alone, among the letters only.
    letter_weight: float = 0.0
    # Keep every non-letter patch's features near the donor tower's (MSE over their variance), so the
    # projector and decoder trained on them still fit: only the letters' features are free to move.
    anchor_weight: float = 0.0
    # A llava-hf checkpoint whose vision tower replaces stage 1 (its vision steps are then skipped).
    vision_from: str | None = None
    # Thin the derived count questions towards uniform answers: one whose answer is n is kept with
    # probability (n / 4)^2. The scenes' shapes are mostly single, so 66% of the derived count answers
    # were "1" and 2% "4" (the count family asks 1-4 uniformly), and the model undercounted: on the
    # test split a 4 was mostly answered 3, a 3 mostly 2 (TRAINING.md).
    balance_counts: bool = False
    # Share of each single-image instruction batch drawn as reading scenes (`letter_scene`: 4-8 letters)
    # with every question they allow: text questions are otherwise ~1.5% of the training turns (only
    # the text family's 2-4 letters per image carry any).
    reading_share: float = 0.0
    # Share of each single-image instruction batch drawn from the count family on top of its round-robin
    # slot: counting is the family that gains slowest (its answer is a proportion read off two heads).
    count_share: float = 0.0
    # Weight of the count questions' rows in the retrieval heads' attention loss, relative to the other
    # questions': a count is read from <s>'s share, 1/(n+1), so mass that leaks off <s> and the counted
    # centres (~half of it in instruct_8) is noise of the size of the difference between 3 and 4.
    count_attention_weight: float = 1.0
    # Weight of `count_heads_loss`: counts also taught to heads 2-3 of `attention_layer`, whose values
    # carry nothing else (needs `count_centres`). Three recipes aimed at heads 0-1 left counting at
    # 0.65-0.675 (TRAINING.md): their values also carry colour and position, noise in the read-out.
    count_heads_weight: float = 0.0
    # Counts as an attribute, read like a colour (TRAINING.md, "What to try next"): in stage 1 every
    # patch of a shape also learns how many shapes of its kind the scene holds (`kind_count_weight`);
    # in instruction tuning the read-out also covers counts with the default count target (every patch
    # of every counted object, `count_readout`), so the heads average a count every patch carries
    # instead of measuring <s>'s share.
    kind_count_weight: float = 0.0
    count_readout: bool = False
    # Stage 1 only, a diagnostic first step towards the above: [CLS] learns each shape kind's count.
    cls_count_weight: float = 0.0
    # Weight of a stage-1 kind loss over the patches of small shapes (at most SMALL_SHAPE patches), each
    # shape weighted equally however many patches it has; those patches are also freed from the anchor.
    # Counting fails where a counted shape is small (0.59 under 30 px against 0.76; TRAINING.md), and
    # the per-patch kind loss gives a 2-patch shape 1/50 of a 100-patch one's weight.
    small_shape_weight: float = 0.0
    eval_every: int = 200
    eval_samples: int = 40
    checkpoint_every: int = 50
    dims: dict = field(default_factory=lambda: asdict(M.ModelDims()))


class RecipeError(InputError):
    """A recipe file, or a donor checkpoint it names, that cannot be trained."""


def rope_theta_of(path) -> float:
    """The RoPE base of a llava-hf checkpoint's decoder."""
    from transformers import LlavaConfig

    try:
        return float(LlavaConfig.from_pretrained(path).text_config.rope_parameters["rope_theta"])
    except OSError as err:
        raise RecipeError(f"init_from {path}: not a llava-hf checkpoint ({err})") from None


def _yaml_loader():
    """PyYAML's safe loader, also reading exponent floats without a dot (1e-3, 1e8) as numbers: YAML 1.1
    takes them for strings, and a learning rate is naturally written so."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


_BAD = object()  # a value its field's type cannot take
# Values a field's type allows but a recipe does not: (what is expected, the test).
_RULES = {"readout_answers": (" or ".join(map(repr, READOUT_ANSWERS)), lambda v: v in READOUT_ANSWERS),
          "rope_theta": ("a positive number", lambda v: v > 0)}
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a list of integers"}


def _checked(kind, value):
    """`value` as a field of type `kind` takes it (ints widen to floats, lists of ints become the
    tuples of step slots), or _BAD."""
    if isinstance(kind, types.UnionType):  # `str | None`
        return None if value is None else _checked(typing.get_args(kind)[0], value)
    if isinstance(value, bool):
        return value if kind is bool else _BAD  # YAML's true and false are no numbers
    if kind is float and isinstance(value, int):
        return float(value)
    if kind is tuple and isinstance(value, list) and all(_checked(int, v) is not _BAD for v in value):
        return tuple(value)
    return value if isinstance(value, kind) else _BAD


def _expected(kind) -> str:
    if isinstance(kind, types.UnionType):
        return f"{_expected(typing.get_args(kind)[0])} or null"
    return _KINDS[kind]


def _fields(cls, data: dict, where: str, prefix: str = "") -> dict:
    """`data` as keyword arguments of dataclass `cls`, each value checked against its field's type;
    unknown keys refused. `dims` is a partial mapping of ModelDims fields over the default dims.
    Errors start with `where` (the file) and name a key as `prefix` + key."""
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in hints]
    if unknown:
        close = {k: difflib.get_close_matches(str(k), hints, n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {close[k][0]!r}?)" if close[k] else "") for k in unknown)
        raise RecipeError(f"{where}: {prefix.replace('.', ': ')}unknown key(s) {said}; the keys are "
                          f"{cls.__name__}'s fields: {', '.join(hints)}")
    values = {}
    for name, value in data.items():
        if name == "dims":
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: dims: expected a mapping of ModelDims fields, got {value!r}")
            values[name] = {**asdict(M.ModelDims()), **_fields(M.ModelDims, value, where, "dims.")}
            continue
        kind, rule = hints[name], _RULES.get(name)
        checked = _checked(kind, value)
        if checked is _BAD or (rule and checked is not None and not rule[1](checked)):
            raise RecipeError(f"{where}: {prefix}{name}: expected {rule[0] if rule else _expected(kind)}, "
                              f"got {value!r}")
        values[name] = checked
    return values


def load(path) -> Recipe:
    """The recipe in a YAML file. Fields it leaves out keep Recipe's defaults, and so do the dims it
    leaves out of `dims`; with `init_from` and no `dims.rope_theta`, the donor's RoPE base (training
    continues under the rotation its weights learnt). Anything else is a RecipeError."""
    import yaml

    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_yaml_loader())
    except OSError as err:
        raise RecipeError(f"recipe file not readable: {path} ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:  # an empty file: every default
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of Recipe fields, got {data!r}")
    recipe = Recipe(**_fields(Recipe, data, str(path)))
    if recipe.init_from and "rope_theta" not in (data.get("dims") or {}):
        try:
            recipe.dims = {**recipe.dims, "rope_theta": rope_theta_of(recipe.init_from)}
        except RecipeError as err:
            raise RecipeError(f"{path}: {err}") from None
    return recipe


def save(recipe: Recipe, path, header: str = "") -> None:
    """`recipe` as a YAML file that `load` reads back to an equal Recipe, every field written (a
    complete record, whatever the defaults become), `header` as its leading comment."""
    import yaml

    data = {f.name: list(v) if isinstance(v := getattr(recipe, f.name), tuple) else v for f in fields(recipe)}
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    Path(path).write_text(comment + yaml.safe_dump(data, sort_keys=False))
