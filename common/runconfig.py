"""The run config, typed and validated once: every knob, its type and the values it allows.

The defaults live in one place, ``[tool.flwr.app.config]`` of pyproject.toml (Flower sends that table, with
``--run-config`` overrides, to the ServerApp and every ClientApp); this model has no defaults of its own,
so a key missing there is an error, not a silent second default. Both sides parse the config they receive
with ``parse``; a bad value is refused naming the key and what it allows.

Keys that only say where the coordinator keeps things (``LOCAL_KEYS``) are not part of what a site
approves: moving the output folder does not change the plan hash.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common import covariates, families
from common.protocol import DEFAULT_K
from common.trees import TreeParams

# where the coordinator keeps files and its key, and its own patience: nothing a site's data is exposed to
LOCAL_KEYS = ("data-root", "output-dir", "audit-key", "query-timeout", "send-batch")


class RunConfigError(ValueError):
    """A run config the run cannot use; the message names each bad key and what it allows."""


class RunConfig(BaseModel):
    """Every knob of a run (``[tool.flwr.app.config]``), by its pyproject name; attributes use underscores."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    num_server_rounds: int = Field(alias="num-server-rounds", ge=1, strict=True)
    evaluate_every: int = Field(alias="evaluate-every", ge=0, strict=True)
    local_epochs: int = Field(alias="local-epochs", ge=1, strict=True)
    learning_rate: float = Field(alias="learning-rate", gt=0)
    weight_decay: float = Field(alias="weight-decay", ge=0)
    min_cases_per_class: int = Field(alias="min-cases-per-class", ge=DEFAULT_K, strict=True)
    test_fraction: float = Field(alias="test-fraction", gt=0, lt=1)
    split_seed: int = Field(alias="split-seed", ge=0, strict=True)
    data_root: str = Field(alias="data-root", strict=True)
    output_dir: str = Field(alias="output-dir", min_length=1, strict=True)
    profile: str = Field(alias="profile", min_length=1, strict=True)
    query_timeout: float = Field(alias="query-timeout", gt=0)
    send_batch: int = Field(alias="send-batch", ge=0, strict=True)
    min_sites: int = Field(alias="min-sites", ge=1, strict=True)
    audit_key: str = Field(alias="audit-key", strict=True)
    harmonization: Literal["combat", "none"] = Field(alias="harmonization")
    combat_parametric: bool = Field(alias="combat-parametric", strict=True)
    combat_eb: bool = Field(alias="combat-eb", strict=True)
    combat_mean_only: bool = Field(alias="combat-mean-only", strict=True)
    combat_covariates: str = Field(alias="combat-covariates", strict=True)
    model_covariates: str = Field(alias="model-covariates", strict=True)
    select_features: int = Field(alias="select-features", ge=0, strict=True)
    select_l1: float = Field(alias="select-l1", ge=0)
    select_candidates: int = Field(alias="select-candidates", ge=1, strict=True)
    select_max_correlation: float = Field(alias="select-max-correlation", gt=0, le=1)
    robustness_min_icc: float = Field(alias="robustness-min-icc", ge=0, lt=1)
    training: Literal["fedavg", "exact"] = Field(alias="training")
    exact_l2: float = Field(alias="exact-l2", ge=0)
    exact_l1: float = Field(alias="exact-l1", ge=0)
    exact_tol: float = Field(alias="exact-tol", gt=0)
    exact_max_rounds: int = Field(alias="exact-max-rounds", ge=1, strict=True)
    exact_min_cases_per_coefficient: float = Field(alias="exact-min-cases-per-coefficient", ge=0)
    tree_rounds: int = Field(alias="tree-rounds", ge=1, le=500, strict=True)
    tree_depth: int = Field(alias="tree-depth", ge=1, le=6, strict=True)
    tree_bins: int = Field(alias="tree-bins", ge=3, le=64, strict=True)  # 2 bins: one edge at z = -3
    tree_learning_rate: float = Field(alias="tree-learning-rate", gt=0, le=1)
    tree_l2: float = Field(alias="tree-l2", ge=0)
    tree_min_child_cases: int = Field(alias="tree-min-child-cases", ge=0, strict=True)
    tree_min_child_hessian: float = Field(alias="tree-min-child-hessian", ge=0)
    dp_noise_multiplier: float = Field(alias="dp-noise-multiplier", ge=0)
    dp_clip_norm: float = Field(alias="dp-clip-norm", gt=0)
    dp_delta: float = Field(alias="dp-delta", gt=0, lt=1)
    dp_query_noise_multiplier: float = Field(alias="dp-query-noise-multiplier", ge=0, allow_inf_nan=False)
    dp_query_clip: float = Field(alias="dp-query-clip", gt=0, allow_inf_nan=False)
    curve_points: int = Field(alias="curve-points", ge=2, le=100, strict=True)
    score_bins: int = Field(alias="score-bins", ge=2, le=400, strict=True)
    decision_thresholds: int = Field(alias="decision-thresholds", ge=1, le=99, strict=True)
    recalibration_max_rounds: int = Field(alias="recalibration-max-rounds", ge=0, le=100, strict=True)
    external_validation: Literal["loso", "none"] = Field(alias="external-validation")
    local_only: Literal["own-pipeline", "none"] = Field(alias="local-only")
    internal_validation: Literal["split", "cv"] = Field(alias="internal-validation")
    cv_folds: int = Field(alias="cv-folds", ge=2, le=20, strict=True)
    cv_repeats: int = Field(alias="cv-repeats", ge=1, le=20, strict=True)
    fold_batching: bool = Field(alias="fold-batching", strict=True)
    loso_warm_start: bool = Field(alias="loso-warm-start", strict=True)
    loso_derived_moments: bool = Field(alias="loso-derived-moments", strict=True)
    loso_prefetch: bool = Field(alias="loso-prefetch", strict=True)
    merge_phases: bool = Field(alias="merge-phases", strict=True)
    models: str = Field(alias="models", strict=True)
    model_l1: float = Field(alias="model-l1", gt=0, allow_inf_nan=False)
    mlp_hidden: int = Field(alias="mlp-hidden", ge=1, le=64, strict=True)
    model_choice: Literal["internal-auc"] = Field(alias="model-choice")

    @field_validator("models")
    @classmethod
    def _models(cls, value: str) -> str:
        families.parse_models(value)  # raises FamilyError (a ValueError) naming the bad entry and the known ones
        return value

    @field_validator("combat_covariates")
    @classmethod
    def _covariates(cls, value: str) -> str:
        covariates.parse(value)  # raises CovariateError (a ValueError) naming the entry and the fix
        return value

    @field_validator("model_covariates")
    @classmethod
    def _model_covariates(cls, value: str) -> str:
        covariates.parse(value, "model-covariates")
        return value

    @model_validator(mode="after")
    def _dp_query_reference(self) -> RunConfig:
        # the noised moments are standardised with ComBat's pooled estimates (docs/privacy.md, section 2a):
        # without them no reference fixed before the release exists
        if self.dp_query_noise_multiplier > 0 and self.harmonization != "combat":
            raise ValueError("dp-query-noise-multiplier > 0 needs harmonization = 'combat' (its pooled grand mean "
                             "and variance are the reference each site standardises and clips its features with); "
                             "set harmonization = 'combat' or dp-query-noise-multiplier = 0")
        # the trees' histograms have no noised form: a run that noises the query phases cannot grow them
        if self.dp_query_noise_multiplier > 0 and "gbt" in self.families:
            raise ValueError("the gbt family sends exact gradient/hessian histograms, which "
                             "dp-query-noise-multiplier > 0 does not noise; take gbt out of models, or set "
                             "dp-query-noise-multiplier = 0")
        return self

    @model_validator(mode="after")
    def _model_covariates_not_noised(self) -> RunConfig:
        # the noised moments are standardised with ComBat's pooled estimates, which do not cover clinical inputs
        if self.model_covariates.strip() and self.dp_query_noise_multiplier > 0:
            raise ValueError("model-covariates cannot be used with dp-query-noise-multiplier > 0 (the noised moments "
                             "are standardised with ComBat's estimates, which cover radiomics features only); set "
                             "model-covariates = '' or dp-query-noise-multiplier = 0")
        # the trees' site handler bins the radiomics inputs only (client/trees.py): clinical inputs are not routed
        if self.model_covariates.strip() and "gbt" in self.families:
            raise ValueError("model-covariates are not model inputs of the gbt family yet: take gbt out of models, "
                             "or set model-covariates = \"\"")
        return self

    @model_validator(mode="after")
    def _dp_updates_need_fedavg(self) -> RunConfig:
        # DP on model updates noises FedAvg's train replies; exact training (the default) sends gradients and
        # Hessians instead, which only the query DP (dp-query-noise-multiplier) noises. Refused rather than
        # switched: the training mode is part of the plan every site approved
        if self.dp_noise_multiplier > 0 and self.training == "exact" and not self.dp_query:
            raise ValueError("dp-noise-multiplier > 0 noises FedAvg updates only, and training = 'exact' sends exact "
                             "gradients and Hessians: set training = 'fedavg' (DP on model updates), or "
                             "dp-query-noise-multiplier > 0 (noised Newton sums), or dp-noise-multiplier = 0")
        if self.dp_noise_multiplier > 0 and "gbt" in self.families:
            raise ValueError("dp-noise-multiplier > 0 noises FedAvg updates only, and the gbt family sends exact "
                             "gradient/hessian histograms: take gbt out of models, or set dp-noise-multiplier = 0")
        return self

    @property
    def dp_query(self) -> bool:
        """Whether the query phases' sums are noised (common/dp_query.py)."""
        return self.dp_query_noise_multiplier > 0

    def tree_params(self) -> TreeParams:
        """The boosting settings of the ``gbt`` family (common/trees.py)."""
        return TreeParams(rounds=self.tree_rounds, depth=self.tree_depth, bins=self.tree_bins,
                          learning_rate=self.tree_learning_rate, l2=self.tree_l2,
                          min_child_cases=self.tree_min_child_cases, min_child_hessian=self.tree_min_child_hessian)

    @property
    def families(self) -> list[str]:
        """The model families the run fits on every cohort, in the order listed (the first is the reference)."""
        return families.parse_models(self.models)

    @property
    def compared(self) -> list[str]:
        """Every model the run fits on each cohort and compares: the families, then (with model-covariates) the
        first listed family on the radiomics features only and on the clinical inputs only."""
        variants = [f"{self.families[0]}:{v}" for v in families.VARIANTS] if self.model_covariates.strip() else []
        return [*self.families, *variants]

    @property
    def combat(self) -> bool:
        return self.harmonization == "combat"

    def covariates(self) -> list[covariates.Covariate]:
        """The ComBat covariates ([] without ComBat or without covariates)."""
        return covariates.parse(self.combat_covariates) if self.combat else []

    def model_covariates_spec(self) -> list[covariates.Covariate]:
        """The clinical covariates the model takes as inputs beside the radiomics features ([] when none)."""
        return covariates.parse(self.model_covariates, "model-covariates")

    @property
    def clinical_inputs(self) -> list[str]:
        """The model's clinical input columns (``clinical/age``, ``clinical/sex=M``), in design order."""
        return covariates.clinical_columns(self.model_covariates_spec())

    def as_dict(self) -> dict[str, Any]:
        """Every key by its pyproject name (what Flower sends)."""
        return self.model_dump(by_alias=True)

    def site_facing(self) -> dict[str, Any]:
        """What the sites approve: every key but the coordinator's local ones (``LOCAL_KEYS``)."""
        return {k: v for k, v in self.as_dict().items() if k not in LOCAL_KEYS}


def _allowed(name: str) -> str:
    """What a key accepts, in words, from the model's own field."""
    field = RunConfig.model_fields[name]
    annotation = field.annotation
    if getattr(annotation, "__origin__", None) is Literal:
        return "one of " + ", ".join(repr(v) for v in annotation.__args__)
    bounds = []
    for item in field.metadata:
        for attr, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                bounds.append(f"{word} {getattr(item, attr)}")
    kind = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}.get(annotation, "a value")
    return kind + (f" {' and '.join(bounds)}" if bounds else "")


def parse(values: Mapping[str, Any]) -> RunConfig:
    """The validated config; raises RunConfigError naming every bad, missing or unknown key."""
    try:
        return RunConfig.model_validate(dict(values))
    except ValidationError as exc:
        by_alias = {f.alias: name for name, f in RunConfig.model_fields.items()}
        problems = []
        for error in exc.errors():
            key = str(error["loc"][0]) if error["loc"] else "?"
            name = by_alias.get(key, key)
            if error["type"] == "missing":
                problems.append(f"'{key}' is missing (add it to [tool.flwr.app.config])")
            elif error["type"] == "extra_forbidden":
                problems.append(f"'{key}' is not a radfed knob (known: {', '.join(sorted(by_alias))})")
            elif name in RunConfig.model_fields and error["type"] != "value_error":
                problems.append(f"'{key}' is {error.get('input')!r}; it must be {_allowed(name)}")
            else:
                problems.append(f"'{key}': {str(error['msg']).removeprefix('Value error, ')}")
        raise RunConfigError("run config: " + "; ".join(problems)) from None
