# Pretraining: one job per (fusion model, pretraining variant). `none` variants need no job.


rule pretrain:
    input:
        train=cache_split("train"),
    output:
        pretrain_path(DATASET, "{fusion}", "{pretrain}"),
    params:
        cfg=EFFECTIVE_CONFIG,
        root=f"{config['cache']['root']}/{DATASET}",
        run_dir=lambda w, output: os.path.dirname(output[0]),
        launch=launcher,
        depends=section_hash("pretrain", "model", "grid", "seed"),
    wildcard_constraints:
        fusion="none|early|fcooper|attfuse|v2xvit",
    resources:
        **TRAINING_RESOURCES,
    retries: 2
    log:
        f"logs/pretrain/{DATASET}_{{fusion}}_{{pretrain}}.log",
    benchmark:
        f"benchmarks/pretrain/{DATASET}_{{fusion}}_{{pretrain}}.tsv"
    shell:
        "{params.launch} pretrain --config {params.cfg} --variant {wildcards.pretrain} --fusion {wildcards.fusion}"
        " --cache {params.root} --out {params.run_dir} > {log} 2>&1"
