"""The toy-world models: names, architectures and training budgets.

Three GPT-NeoX models of growing size (rotary positions, like Pythia) answer "with scale"
questions; a GPT-2 model (learned absolute positions) of the middle size lets a notebook compare
the two position schemes.  ``make models`` trains all of them with the specs below, and then
notebook 15's metatoken pair (:data:`METATOKEN_MODELS`, ``lib.world.metatokens``) and notebook 16's
retrodictor (:data:`RETRO_MODELS`, ``lib.world.retro``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str  # "neox" | "gpt2"
    n_layers: int
    d_model: int
    n_heads: int
    steps: int
    n_ctx: int = 256
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    curriculum_steps: int = 0  # the first steps read the first-phase corpus (CorpusConfig.curriculum)

    @property
    def d_mlp(self) -> int:
        return 4 * self.d_model

    def to_dict(self) -> dict:
        return asdict(self)

    def cost(self, steps: int | None = None) -> float:
        """Training FLOPs, roughly (6 x parameters x tokens): to schedule the longest run first."""
        params = 12 * self.n_layers * self.d_model**2 + 2 * 2048 * self.d_model
        return 6.0 * params * (steps or self.steps) * self.batch_size * self.n_ctx


TOY_MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("toy-1l", "neox", n_layers=1, d_model=128, n_heads=4, steps=8000, curriculum_steps=4000),
        ModelSpec("toy-2l", "neox", n_layers=2, d_model=128, n_heads=4, steps=12000, curriculum_steps=5000),
        ModelSpec("toy-4l", "neox", n_layers=4, d_model=128, n_heads=4, steps=12000, curriculum_steps=4000),
        ModelSpec("toy-6l", "neox", n_layers=6, d_model=256, n_heads=8, steps=4000, lr=1.5e-3, curriculum_steps=2000),
        ModelSpec("toy-gpt2-2l", "gpt2", n_layers=2, d_model=128, n_heads=4, steps=8000, curriculum_steps=5000),
    ]
}
# Notebook 15's pair (conditional training, lib.world.metatokens): one 2-layer spec, toy-2l's curriculum
# share (5/12) at half its steps; A reads the corpus tagged with <|good|>/<|bad|>, B the same rows
# untagged.  Kept out of TOY_MODELS: nothing that measures "every toy model" trains or reads them.
METATOKEN_MODELS: dict[str, ModelSpec] = {
    name: ModelSpec(name, "neox", n_layers=2, d_model=128, n_heads=4, steps=6000, curriculum_steps=2500)
    for name in ("toy-meta-a", "toy-meta-b")
}
# Notebook 16's retrodictor (lib.world.retro): toy-2l's spec, seed, corpus rows and order, each row's
# text reversed after BOS, so that it predicts the tokens before a chunk.  Kept out of TOY_MODELS too.
RETRO_MODELS: dict[str, ModelSpec] = {"toy-2l-rev": replace(TOY_MODELS["toy-2l"], name="toy-2l-rev")}
RETRO_FORWARD = {"toy-2l-rev": "toy-2l"}  # each retrodictor's forward twin
# Notebook 11's models (lib.sae.shared): one 4-block spec (4 blocks for a shared SAE to span; d = 64 and
# a quarter of toy-4l's steps so that six train in about 40 minutes on 2 cores), three ways of training
# (plain LM; + a shared SAE's loss, model clean; + the SAE spliced in at every block) x 2 seeds.
SHARED_SAE_STEPS = 3000
SHARED_SAE_SEEDS = (0, 1)
SHARED_SAE_MODELS: dict[str, ModelSpec] = {
    f"toy-shared-{mode}-s{seed}": ModelSpec(f"toy-shared-{mode}-s{seed}", "neox", n_layers=4, d_model=64, n_heads=4,
                                            steps=SHARED_SAE_STEPS, curriculum_steps=1250, seed=seed)
    for seed in SHARED_SAE_SEEDS for mode in ("spliced", "aux", "plain")
}


def _joint(name: str):
    from lib.sae.shared import JointConfig

    return JointConfig(mode=name.split("-")[2], d_sae=512, k=16, coefficient=1.0)


SHARED_SAE_JOINT = {name: _joint(name) for name in SHARED_SAE_MODELS}  # how each trains its shared SAE
DEFAULT_MODEL = "toy-4l"  # chosen in 00: the model closest to the judgement and recall targets (recall.choose_default)


def training_log(name: str) -> dict:
    """The training curves saved beside a built toy model (``training_log.json``)."""
    import json

    from lib import paths

    path = paths.models_dir() / name / "training_log.json"
    if not path.exists():
        raise FileNotFoundError(f"no training log for {name!r} at {path}; build it with `make models`")
    return json.loads(path.read_text())
