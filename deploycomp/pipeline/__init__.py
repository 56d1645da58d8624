"""deploycomp pipeline: a recipe (YAML) -> every branch of the road -> one comparison report.

A recipe names a model (or a baseline to train), a dataset, a list of *variants* (compressions: sparsity
training, distillation, pruning with fine-tuning, depth pruning) and what every branch then goes
through: evaluate, export to ONNX (with parity), quantize, build a TensorRT engine (when TensorRT is
present) and benchmark. The original model is a branch too (the first row of the report).

Every step is a *stage* of a kind registered in :data:`STAGES` (load, train, distill, prune, evaluate,
export, quantize, build, bench). A stage is identified by a hash of its kind, its options, its
parent stage's hash, its other inputs and the deploycomp version; it writes its artifact and a
``record.json`` under ``RUN_DIR/stages/<kind>-<hash>/`` (atomically, record last). A stage whose
``record.json`` exists is done: re-running skips it, an interrupted run continues with the first
stage that has none, ``force`` redoes them all. Identical stages of two variants (say, the same
sparsity training before two pruning ratios) run once.

Recipe keys are checked before any work starts: an unknown key (with the closest valid one), a wrong
type or an impossible value is one line naming the file, the key path and what is allowed. The keys
of the stage sections are derived from the libraries' own config dataclasses and signatures
(:class:`~deploycomp.train.TrainConfig`, :class:`~deploycomp.prune.PruneConfig`,
:class:`~deploycomp.bench.BenchConfig`, :func:`~deploycomp.export.export_onnx`, ...), so an option
added there is accepted here without a second list.

The package, one module per concern (read in this order to add a recipe key or a stage):

    schema.py    the keys a recipe may have (derived from the config dataclasses and signatures)
    recipe.py    load_recipe: read, check, merge studies, validate values; resolve_model_ref
    code.py      user code a recipe names: where it is, the run's consent to run it, its record in run.json
    configs.py   recipe sections -> library configs (TrainConfig, PruneConfig, BenchConfig)
    stages.py    the STAGES registry, the Stage node (its key) and one function per stage kind
    plan.py      a study -> its stage graph (branches; the quantize, build and bench stages of each)
    run.py       PipelineRun (caching, --force, run.json) and run_pipeline
"""

from deploycomp.pipeline.configs import TRAIN_EXTRAS, bench_config, prune_config, train_config
from deploycomp.pipeline.plan import Branch, StudyPlan, describe_steps, plan_study
from deploycomp.pipeline.recipe import (
    DEFAULT_RECIPE,
    ORIGINAL,
    RECIPES_DIR,
    REPO_ROOT,
    Recipe,
    Study,
    load_recipe,
    resolve_model_ref,
    validate_values,
)
from deploycomp.pipeline.run import RUN_FORMAT, RUN_FORMAT_VERSION, PipelineRun, RunOptions, run_pipeline
from deploycomp.pipeline.schema import (
    VARIANT_STEPS,
    RecipeError,
    Section,
    _prune_section,
    _train_section,
    check_recipe,
    recipe_section,
)
from deploycomp.pipeline.stages import MODEL_FILE, STAGES, Stage, StageKind, StageRun, register_stage

__all__ = [
    "DEFAULT_RECIPE", "MODEL_FILE", "ORIGINAL", "RECIPES_DIR", "REPO_ROOT", "RUN_FORMAT", "RUN_FORMAT_VERSION",
    "STAGES", "TRAIN_EXTRAS", "VARIANT_STEPS", "Branch", "PipelineRun", "Recipe", "RecipeError", "RunOptions",
    "Section", "Stage", "StageKind", "StageRun", "Study", "StudyPlan", "bench_config", "describe_steps",
    "load_recipe", "plan_study", "prune_config", "recipe_section", "register_stage", "resolve_model_ref",
    "run_pipeline", "train_config", "validate_values", "check_recipe", "_prune_section", "_train_section",
]
