"""Every registered method with the parameters the tests' tiny models need (as kvpress's
`tests/default_presses.py`). The contract tests are parametrised over `DEFAULT_METHODS`, and
`test_methods.py` fails when it does not name exactly the registered methods: a new method needs an
entry (`{}` when its defaults suit a 2-layer model).
"""

#: Stands for a codebook in the test model's projector space, which a test builds and fills in
#: (`default_params`); as a path it names no file, so an unfilled entry fails loudly.
CODEBOOK = "<codebook built by the test>"

DEFAULT_METHODS: dict[str, dict] = {
    "none": {},
    "random": {},
    "uniform": {},
    "fastv": {"layer": 1},  # K must be below the tiny model's 2 decoder layers
    "cls_attention": {},
    "divprune": {},
    # 0.9: a test codebook is a few of the model's own tokens, perturbed; the release's 0.45 would
    # drop nearly every token of a random tiny model.
    "codebook": {"path": CODEBOOK, "tau": 0.9},
    "codebook_fixed": {"path": CODEBOOK},
    "gprune": {},
    "lofi": {},
}


def default_params(name: str, codebook=None) -> dict:
    """`name`'s parameters, with the CODEBOOK marker replaced by the path `codebook` when given."""
    return {key: str(codebook) if value == CODEBOOK and codebook is not None else value
            for key, value in DEFAULT_METHODS[name].items()}
