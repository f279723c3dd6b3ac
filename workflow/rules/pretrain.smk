# Pretraining: one job per (fusion model, pretraining variant). `none` variants need no job; a
# variant naming several datasets (`pretrain.variants.<name>.datasets`) reads the union of their caches.


rule pretrain:
    conda:
        "../../environment.yml"
    input:
        train=lambda w: [cache_split("train", d) for d in C.variant_datasets(config, w.pretrain)],
    output:
        path("pretrained"),
    params:
        caches=lambda w, input: " ".join(f"--cache {os.path.dirname(p)}" for p in input.train),
        run_dir=lambda w, output: os.path.dirname(output[0]),
        launch=launcher,
        depends=lambda w: depends("pretrain", w.pretrain, w.budget),
    wildcard_constraints:
        fusion=one_of(C.TRAINED_FUSIONS),
    resources:
        **TRAINING_RESOURCES,
    log:
        path("pretrain_log"),
    benchmark:
        path("pretrain_benchmark")
    shell:
        "{params.launch} pretrain --config {resources.config_file} --variant {wildcards.pretrain}"
        " --fusion {wildcards.fusion} --budget {wildcards.budget} {params.caches}"
        " --out {params.run_dir} --log {log} --attempt {resources.attempt}"


rule show_masking:
    conda:
        "../../environment.yml"
    input:
        pretrained=path("pretrained"),
        val=cache_split("val"),
    output:
        path("masking_figure"),
    params:
        root=lambda w, input: os.path.dirname(input.val),
        objective=lambda w, input: os.path.join(os.path.dirname(input.pretrained), "objective.pt"),
    wildcard_constraints:
        fusion=one_of(C.TRAINED_FUSIONS),
    resources:
        **JOB_RESOURCES,
    log:
        path("masking_log"),
    shell:
        "turbotrain show-masking --config {resources.config_file} --variant {wildcards.pretrain}"
        " --fusion {wildcards.fusion}"
        " --cache {params.root} --checkpoint {params.objective} --split val --out {output}"
        " --log {log} --attempt {resources.attempt}"
