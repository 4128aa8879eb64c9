"""A run's ``model.pt`` for `radfed predict`: reading it and checking it against this radfed and this site.

``load_model_file`` reads the file (``weights_only``: no code runs on load), checks it is radfed's logistic
model with one name per input, and says which run made it: ``model.pt["run_id"]``, else the run folder's name
(``<time>-run<id>``). ``check_protocol`` and ``check_profile`` refuse a model written under another protocol
or trained on another extraction profile than the site's. Every problem is a ``PredictRefusal`` naming the
file and the fix. torch is imported only when a file is read, so ``radfed predict --help`` stays light.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from client.predict_refusals import PredictRefusal

if TYPE_CHECKING:
    import torch

    from common.profile import Profile

_RUN_FOLDER = re.compile(r"-run(\d+)$")  # server.app names a run folder <time>-run<run id>


@dataclass
class ModelFile:
    """A run's ``model.pt`` as written by server.app, with what predict needs to know about it."""

    path: Path
    sha256: str  # of the file
    weights_sha256: str  # common.canon.arrays_sha256 of the state dict: the audit log's model_sha256
    state: dict[str, torch.Tensor]
    features: list[str]
    profile_sha256: str
    protocol: str
    run_id: str | None = None  # model.pt["run_id"] (proposed), else the run folder's name
    run_id_source: str | None = None
    harmonization: str | None = None  # model.pt["harmonization"] (proposed): "combat" or "none"
    agreed_sha256: str | None = None  # model.pt["agreed_features_sha256"] (proposed)

    @property
    def weights(self) -> np.ndarray:
        return self.state["linear.weight"].detach().cpu().numpy().reshape(-1)

    @property
    def intercept(self) -> float:
        return float(self.state["linear.bias"].detach().cpu().numpy().reshape(-1)[0])


def load_model_file(path: str | Path) -> ModelFile:
    """Read and check ``model.pt``; raises PredictRefusal naming the file and the fix."""
    import torch

    from common.canon import arrays_sha256, file_sha256
    from common.model import model_from_state

    path = Path(path).expanduser()
    fix_path = "pass the model.pt of a finished run: --model <run folder>/model.pt"
    if not path.is_file():
        raise PredictRefusal(f"model file {path} does not exist", fix_path)
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: no code runs on load
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise PredictRefusal(f"{path} is not a radfed model file (torch cannot read it: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})",
                             fix_path) from exc
    needed = ("state_dict", "features", "profile_sha256", "protocol")
    missing = [k for k in needed if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise PredictRefusal(f"{path} is not a radfed model file: it lacks {', '.join(missing)}", fix_path)
    state, features = doc["state_dict"], [str(n) for n in doc["features"]]
    if isinstance(state, dict) and "leaf" in state:  # common/trees.py's arrays
        raise PredictRefusal(f"{path} holds gradient-boosted trees (training = \"gbt\"), which radfed predict does not "
                             "score yet", "use the model.pt of a run with training = \"exact\" or \"fedavg\" (trees "
                             "reach radfed predict with the model-family registry, issue 19)")
    try:
        net = model_from_state(state)
    except (RuntimeError, KeyError, AttributeError, TypeError) as exc:
        raise PredictRefusal(f"{path}: its state dict is not radfed's logistic model ({exc})", fix_path) from exc
    if int(net.mean.shape[0]) != len(features):
        raise PredictRefusal(f"{path} is inconsistent: {len(features)} feature names for a model of "
                             f"{int(net.mean.shape[0])} inputs", "use the model.pt a run wrote, unmodified")
    if len(set(features)) != len(features):
        raise PredictRefusal(f"{path} names a feature twice", "use the model.pt a run wrote, unmodified")
    weights_sha256 = arrays_sha256({k: v.detach().cpu().numpy() for k, v in state.items()})
    run_id, source = (str(doc["run_id"]), "model.pt") if doc.get("run_id") is not None else (None, None)
    if run_id is None and (match := _RUN_FOLDER.search(path.resolve().parent.name)):
        run_id, source = match.group(1), "the run folder's name"
    harmonization = str(doc["harmonization"]) if doc.get("harmonization") is not None else None
    if harmonization not in (None, "combat", "none"):
        raise PredictRefusal(f"{path} says harmonization={harmonization!r}, which radfed predict does not know",
                             "use a radfed release that knows it, or a model from a run with combat or none")
    agreed = str(doc["agreed_features_sha256"]) if doc.get("agreed_features_sha256") else None
    return ModelFile(path=path, sha256=file_sha256(path), weights_sha256=weights_sha256, state=state,
                     features=features, profile_sha256=str(doc["profile_sha256"]), protocol=str(doc["protocol"]),
                     run_id=run_id, run_id_source=source, harmonization=harmonization, agreed_sha256=agreed)


def check_protocol(model: ModelFile) -> None:
    """Refuse a model written under another radfed protocol than this one's."""
    from common.protocol import PROTOCOL_VERSION

    if model.protocol != PROTOCOL_VERSION:
        raise PredictRefusal(
            f"{model.path} was written under radfed protocol {model.protocol}; this radfed speaks protocol "
            f"{PROTOCOL_VERSION}, so its features, harmonisation or model may not mean the same",
            f"use the radfed release the federation ran with (protocol {model.protocol}), or a model from a run "
            f"under protocol {PROTOCOL_VERSION}")


def _bundled_profile_with(sha256: str) -> str | None:
    from common.profile import PROFILE_DIR, ProfileError, load_profile

    for path in sorted(PROFILE_DIR.glob("*.yaml")):
        try:
            if load_profile(path).sha256 == sha256:
                return path.stem
        except ProfileError:
            continue
    return None


def check_profile(model: ModelFile, profile: Profile, site_dir: Path) -> None:
    """Refuse a model trained on another extraction profile than the site's, naming the profile to set."""
    if profile.sha256 == model.profile_sha256:
        return
    bundled = _bundled_profile_with(model.profile_sha256)
    hint = (f"set 'profile: {bundled}' in {site_dir / 'site.yaml'}" if bundled else
            f"set 'profile:' in {site_dir / 'site.yaml'} to the federation's profile file (its hash, shown by "
            f"'radfed profile show FILE', must be {model.profile_sha256})")
    raise PredictRefusal(
        f"the site's extraction profile ({profile.name} v{profile.version}, sha256 {profile.sha256}, from "
        f"{profile.source}) is not the one the model was trained on (sha256 {model.profile_sha256}): its "
        "features would not mean what the model's weights expect",
        f"{hint}, or use a model from a run made with this site's profile")

