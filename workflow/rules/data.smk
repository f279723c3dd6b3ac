# Data: generate (synthetic) or download the raw data of every configured dataset (`dataset` and
# `extra_datasets`), then one fusion-cache job per (dataset, split). The `dataset` wildcard takes
# only configured names, and each source's rule only the names of its datasets; every job reads the
# frozen config with `--dataset <name>` and hashes only what its own data depends on.


if C.datasets_from(config, "synthetic"):

    rule generate:
        conda:
            "../../environment.yml"
        output:
            directory(raw_pattern("synthetic")),
        params:
            depends=lambda w: depends("raw", w.dataset),
        wildcard_constraints:
            dataset=one_of(C.datasets_from(config, "synthetic")),
        threads: lambda w: generator_workers(w.dataset)
        resources:
            **JOB_RESOURCES,
        log:
            C.PATHS["generate_log"],
        benchmark:
            C.PATHS["generate_benchmark"]
        shell:
            "turbotrain generate --config {resources.config_file} --dataset {wildcards.dataset} --out {output}"
            " --log {log} --attempt {resources.attempt}"


if C.datasets_from(config, "download"):

    rule download:
        conda:
            "../../environment.yml"
        output:
            directory(raw_pattern("download")),
        params:
            depends=lambda w: depends("download", w.dataset),
        wildcard_constraints:
            dataset=one_of(C.datasets_from(config, "download")),
        resources:
            **JOB_RESOURCES,
        log:
            C.PATHS["download_log"],
        shell:
            "turbotrain download --config {resources.config_file} --dataset {wildcards.dataset} --out {output}"
            " --log {log} --attempt {resources.attempt}"


rule fuse:
    conda:
        "../../environment.yml"
    input:
        lambda w: raw_dir(w.dataset),
    output:
        directory(cache_pattern()),
    params:
        root=lambda w, output: os.path.dirname(output[0]),
        depends=lambda w: depends("cache", w.dataset),
        local_files=lambda w: C.local_data_digest(config, w.dataset),
    wildcard_constraints:
        dataset=one_of(DATASETS),
        split=one_of(C.SPLITS),
    threads: lambda w: C.with_dataset(config, w.dataset)["cache"]["workers"]
    resources:
        **JOB_RESOURCES,
    log:
        C.PATHS["fuse_log"],
    benchmark:
        C.PATHS["fuse_benchmark"]
    shell:
        "turbotrain fuse --config {resources.config_file} --dataset {wildcards.dataset} --raw {input}"
        " --split {wildcards.split}"
        " --out {params.root} --log {log} --attempt {resources.attempt}"


rule show_sample:
    conda:
        "../../environment.yml"
    input:
        cache_split("val"),
    output:
        path("sample_figure"),
    params:
        root=lambda w, input: os.path.dirname(input[0]),
    resources:
        **JOB_RESOURCES,
    log:
        path("show_log"),
    shell:
        "turbotrain show --config {resources.config_file} --cache {params.root} --split val --index 0 --out {output}"
        " --log {log} --attempt {resources.attempt}"
