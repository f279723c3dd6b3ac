# Validation and pure input functions over the pipeline contract (src/turbotrain/contract.py): the
# names, product paths and per-product dependencies all come from there.
from turbotrain import contract as C
DATASET = config["dataset"]["name"]
DATASETS = C.dataset_names(config)
RUNS = C.expand_runs(config)
# The config every job of this invocation reads, frozen under its content's digest: another
# Snakemake command in this folder gets a file of its own and cannot change what these jobs read.
# (The one write of the workflow: it creates a file when absent and never changes one.) Rules hand
# its path to the job as a string resource, not a param: a param would rerun every job whenever any
# config value changes, while each job's `depends` param already names what it depends on.
FROZEN_CONFIG = C.frozen_config_path(config)


def one_of(values):
    """Wildcard constraint matching exactly these values."""
    return "|".join(re.escape(v) for v in values)


def path(product, **fields):
    """A product's path template with the primary dataset filled in where it takes one."""
    names = set(re.findall(r"{(\w+)}", C.PATHS[product]))
    return C.template(product, **({"dataset": DATASET} if "dataset" in names else {}), **fields)


def raw_dir(dataset):
    return C.raw_dir(config, dataset)


def raw_pattern(source):
    """`<root>/{dataset}`, where generate (or download) writes the raw data of `source` datasets
    (one root per source, as `check_config` makes sure)."""
    (root,) = {C.with_dataset(config, n)["dataset"]["root"] for n in C.datasets_from(config, source)}
    return C.template("raw", root=root)


def cache_split(split, dataset=None):
    return C.cache_dir(config, split, dataset)


def cache_pattern():
    return C.template("cache", cache_root=config["cache"]["root"])


def depends(kind, *args):
    """The `depends` param of a job: the digest of what its product depends on (contract)."""
    return C.depends_hash(getattr(C, f"{kind}_depends")(config, *args))


def rebuild_stamp(product, inputs):
    """Rebuild `product` when one of its `inputs` was deleted (see `contract.rebuild_stamp`)."""
    return C.rebuild_stamp(product, [p for p in inputs if p])


def generator_workers(dataset):
    return C.with_dataset(config, dataset)["dataset"]["synthetic_overrides"].get("workers", 1)


def gpu_resources():
    """GPU request of a training job; `resources.use_gpu: false` turns it off (CI, CPU clusters)."""
    r = config["resources"]
    return r["gpus_per_training_job"] if r["use_gpu"] else 0


def run_of(w):
    return C.Run.from_fields(DATASET, w.fusion, w.pretrain, w.recipe, w.balancer, w.fraction, w.seed, w.budget)


def trained_path(w, product):
    """A training product of the run that trained this run's model (`contract.training_run`)."""
    return C.training_run(config, run_of(w)).path(product)


def table_targets():
    return [C.template("table", table=t) for t in C.grid_tables(config)]


def masking_figures():
    """One masking picture per (fusion, variant) pair of the grid whose pretraining masks LiDAR."""
    return [path("masking_figure", fusion=f, pretrain=p, budget=b) for f, p, b in C.pretraining_jobs(config)
            if C.variant_type(config, p) in C.LIDAR_TYPES]


def figure_targets():
    types = {C.variant_type(config, r.pretrain) for r in RUNS}
    figures = [f for f in C.FIGURES if f != "trajectory_pretraining" or types & set(C.TRAJECTORY_TYPES)]
    figures = [f for f in figures if f != "claims" or "claims" in C.grid_tables(config)]
    return masking_figures() + [C.template("figure", figure=f) for f in figures]


def launcher(wildcards, resources):
    """`torchrun` with one process per GPU of the job, else a plain process (CPU or one GPU)."""
    gpus = int(resources.get("gpu", 0) or 0)
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node {gpus} -m turbotrain.cli"
    return "turbotrain"


def pretrained_input(w):
    """The pretrained weights a fine-tuning run starts from (none for scratch runs)."""
    if C.variant_type(config, w.pretrain) == "none":
        return []
    return C.pretrained_path(DATASET, w.fusion, w.pretrain, w.budget)


# Every job gets the frozen config's path and its attempt number (a retry keeps the earlier
# attempts' logs and ends at once after a failure that cannot succeed on retry; utils/joblog.py).
JOB_RESOURCES = dict(config_file=FROZEN_CONFIG, attempt=lambda w, attempt: attempt)
# A retried training job asks for more memory: the retry is for an OOM kill (SLURM requeues
# preempted jobs itself, and config/data/NaN failures are not retried).
TRAINING_RESOURCES = dict(
    **JOB_RESOURCES,
    gpu=gpu_resources(),
    cpus_per_task=config["resources"]["cpus_per_job"],
    mem_mb=lambda w, attempt: config["resources"]["mem_mb_training"] * attempt,
    runtime=config["resources"]["runtime_training_min"],
)


def require_cluster_tools(executor):
    """Fail at once, with the reason, when the SLURM executor runs where there is no SLURM client
    (otherwise the first job submission fails on a missing `sacct`)."""
    import shutil

    if executor is None or executor.name != "slurm":
        return
    missing = [tool for tool in ("sbatch", "squeue", "scancel") if shutil.which(tool) is None]
    if missing:
        raise WorkflowError(f"SLURM not found: {', '.join(missing)} not on PATH on this machine. Run "
                            "`snakemake --profile slurm ...` on a cluster login node, or without the profile "
                            "here (e.g. `snakemake -c2 all`).")
