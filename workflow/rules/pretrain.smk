# Pretraining: one job per (fusion model, pretraining variant). `none` variants need no job; a
# variant naming several datasets (`pretrain.variants.<name>.datasets`) reads the union of their caches.


rule pretrain:
    conda:
        "../../environment.yml"
    input:
        train=lambda w: [cache_split("train", d) for d in variant_datasets(config, w.pretrain)],
    output:
        pretrain_path(DATASET, "{fusion}", "{pretrain}"),
    params:
        cfg=EFFECTIVE_CONFIG,
        caches=lambda w, input: " ".join(f"--cache {os.path.dirname(p)}" for p in input.train),
        run_dir=lambda w, output: os.path.dirname(output[0]),
        launch=launcher,
        depends=lambda w: pretrain_hash(w.pretrain),
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
        " {params.caches} --out {params.run_dir} > {log} 2>&1"


rule show_masking:
    conda:
        "../../environment.yml"
    input:
        pretrained=pretrain_path(DATASET, "{fusion}", "{pretrain}"),
        val=cache_split("val"),
    output:
        f"results/figures/{DATASET}_masking_{{fusion}}_{{pretrain}}.png",
    params:
        cfg=EFFECTIVE_CONFIG,
        root=lambda w, input: os.path.dirname(input.val),
        objective=lambda w, input: os.path.join(os.path.dirname(input.pretrained), "objective.pt"),
    wildcard_constraints:
        fusion="none|early|fcooper|attfuse|v2xvit",
    log:
        f"logs/show_masking/{DATASET}_{{fusion}}_{{pretrain}}.log",
    shell:
        "turbotrain show-masking --config {params.cfg} --variant {wildcards.pretrain} --fusion {wildcards.fusion}"
        " --cache {params.root} --checkpoint {params.objective} --split val --out {output} > {log} 2>&1"
