# Data: generate (synthetic) or download the raw dataset, then one fusion-cache job per split.


if config["dataset"]["source"] == "synthetic":

    rule generate:
        conda:
            "../../environment.yml"
        output:
            directory(raw_root(config)),
        params:
            cfg=EFFECTIVE_CONFIG,
            depends=dataset_hash(),
        threads: config["dataset"]["synthetic_overrides"].get("workers", 1)
        log:
            f"logs/generate/{DATASET}.log",
        benchmark:
            f"benchmarks/generate/{DATASET}.tsv"
        shell:
            "turbotrain generate --config {params.cfg} --out {output} > {log} 2>&1"

elif config["dataset"]["source"] == "download":

    rule download:
        conda:
            "../../environment.yml"
        output:
            directory(raw_root(config)),
        params:
            cfg=EFFECTIVE_CONFIG,
            depends=section_hash("dataset"),
        log:
            f"logs/download/{DATASET}.log",
        shell:
            "turbotrain download --config {params.cfg} --out {output} > {log} 2>&1"


rule fuse:
    conda:
        "../../environment.yml"
    input:
        raw_root(config),
    output:
        directory(f"{config['cache']['root']}/{DATASET}/{{split}}"),
    params:
        cfg=EFFECTIVE_CONFIG,
        root=lambda w, output: os.path.dirname(output[0]),
        depends=fusion_hash(),
    wildcard_constraints:
        split="train|val|test",
    log:
        f"logs/fuse/{DATASET}_{{split}}.log",
    benchmark:
        f"benchmarks/fuse/{DATASET}_{{split}}.tsv"
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
