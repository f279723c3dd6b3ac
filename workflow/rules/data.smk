# Data: generate (synthetic) or download the raw data of every configured dataset (`dataset` and
# `extra_datasets`), then one fusion-cache job per (dataset, split). The `dataset` wildcard takes
# only configured names, and each source's rule only the names of its datasets; a dataset's jobs
# read its own config (`effective_config(name)`) and hash only what its data depends on.


if datasets_from("synthetic"):

    rule generate:
        conda:
            "../../environment.yml"
        output:
            directory(raw_pattern("synthetic")),
        params:
            cfg=lambda w: effective_config(w.dataset),
            depends=lambda w: dataset_hash(w.dataset),
        wildcard_constraints:
            dataset=one_of(datasets_from("synthetic")),
        threads: lambda w: generator_workers(w.dataset)
        log:
            "logs/generate/{dataset}.log",
        benchmark:
            "benchmarks/generate/{dataset}.tsv"
        shell:
            "turbotrain generate --config {params.cfg} --out {output} > {log} 2>&1"


if datasets_from("download"):

    rule download:
        conda:
            "../../environment.yml"
        output:
            directory(raw_pattern("download")),
        params:
            cfg=lambda w: effective_config(w.dataset),
            depends=lambda w: download_hash(w.dataset),
        wildcard_constraints:
            dataset=one_of(datasets_from("download")),
        log:
            "logs/download/{dataset}.log",
        shell:
            "turbotrain download --config {params.cfg} --out {output} > {log} 2>&1"


rule fuse:
    conda:
        "../../environment.yml"
    input:
        lambda w: raw_dir(w.dataset),
    output:
        directory(f"{config['cache']['root']}/{{dataset}}/{{split}}"),
    params:
        cfg=lambda w: effective_config(w.dataset),
        root=lambda w, output: os.path.dirname(output[0]),
        depends=lambda w: fusion_hash(w.dataset),
    wildcard_constraints:
        dataset=one_of(DATASETS),
        split="train|val|test",
    log:
        "logs/fuse/{dataset}_{split}.log",
    benchmark:
        "benchmarks/fuse/{dataset}_{split}.tsv"
    shell:
        "turbotrain fuse --config {params.cfg} --raw {input} --split {wildcards.split} --out {params.root} > {log} 2>&1"


rule show_sample:
    conda:
        "../../environment.yml"
    input:
        cache_split("val"),
    output:
        f"results/figures/{DATASET}_sample_bev.png",
    params:
        cfg=EFFECTIVE_CONFIG,
        root=lambda w, input: os.path.dirname(input[0]),
    log:
        f"logs/show/{DATASET}.log",
    shell:
        "turbotrain show --config {params.cfg} --cache {params.root} --split val --index 0 --out {output} > {log} 2>&1"
