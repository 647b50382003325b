"""Every registered method with the parameters the tests' tiny models need (as kvpress's
`tests/default_presses.py`). The contract tests are parametrised over `DEFAULT_METHODS`, and
`test_methods.py` fails when it does not name exactly the registered methods: a new method needs an
entry (`{}` when its defaults suit a 2-layer model).
"""

#: Stands for a codebook in the test model's projector space, which a test builds and fills in
#: (`default_params`); as a path it names no file, so an unfilled entry fails loudly.
CODEBOOK = "<codebook built by the test>"
#: Stands for an LVPruning module file of the test model's width and depth, randomly initialised
#: (`lvpruning_modules`), which a test builds and fills in; unfilled, it names no file.
LVPRUNING_MODULES = "<module file built by the test>"

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
    "lvpruning": {"path": LVPRUNING_MODULES},
}


#: Methods that remove tokens before several decoder layers: the per-family adapter tests' by-hand decoders are
#: single-stage, so they take `SINGLE_STAGE`; test_families.py and test_lvpruning.py check these on every family.
MULTI_STAGE = ("lvpruning",)
SINGLE_STAGE = {name: params for name, params in DEFAULT_METHODS.items() if name not in MULTI_STAGE}


def default_params(name: str, codebook=None, modules=None) -> dict:
    """`name`'s parameters, with the CODEBOOK marker replaced by the path `codebook` and the LVPRUNING_MODULES
    marker by the path `modules`, when given."""
    fill = {CODEBOOK: codebook, LVPRUNING_MODULES: modules}
    return {key: str(fill[value]) if isinstance(value, str) and fill.get(value) is not None else value
            for key, value in DEFAULT_METHODS[name].items()}


#: The tiny models' stages: a module before every decoder layer (2-layer LLaVA, LLaVA-NeXT, OneVision;
#: 3-layer Qwen), keep-ratio targets decreasing as the paper's do.
LVPRUNING_TARGETS = {2: (0.5, 0.25), 3: (0.5, 0.3, 0.1)}


def lvpruning_modules(path, config, layers=None, targets=None, seed=0):
    """Write randomly initialised (seeded) LVPruning modules for a model of `config` to `path`: a stage before
    each of `layers` (default: every decoder layer of a 2- or 3-layer model) with `targets`; 8 heads where the
    width allows, else its largest divisor below 8. Random modules choose arbitrarily but deterministically."""
    from methods import lvpruning_modules as files

    text = getattr(config, "text_config", config)
    depth, hidden = text.num_hidden_layers, text.hidden_size
    layers = tuple(range(depth)) if layers is None else tuple(layers)
    targets = LVPRUNING_TARGETS[len(layers)] if targets is None else tuple(targets)
    heads = next(h for h in range(8, 0, -1) if hidden % h == 0)
    modules = files.build(hidden, len(layers), heads, seed=seed)
    return files.save(path, modules, layers=layers, decoder_layers=depth, targets=targets,
                      training={"command": "tests/default_methods.py: random modules"})
