# Evaluation: one metrics JSON per run. Late fusion evaluates the no-fusion checkpoint per agent.


rule evaluate:
    conda:
        "../../environment.yml"
    input:
        checkpoint=trained_checkpoint,
        summary=lambda w: f"{run_from_wildcards(w).train_dir}/summary.json",
        test=cache_split(config["evaluation"]["split"]),
    output:
        "results/metrics/%s/{fusion}/{pretrain}/{recipe}-{balancer}/lf{fraction}/seed{seed}.json" % DATASET,
    params:
        cfg=EFFECTIVE_CONFIG,
        root=lambda w, input: os.path.dirname(input.test),
        depends=evaluation_hash(),
    wildcard_constraints:
        fusion="none|early|late|fcooper|attfuse|v2xvit",
        seed=r"\d+",
    resources:
        gpu=gpu_resources(),
    log:
        "logs/evaluate/%s/{fusion}/{pretrain}/{recipe}-{balancer}/lf{fraction}/seed{seed}.log" % DATASET,
    benchmark:
        "benchmarks/evaluate/%s/{fusion}/{pretrain}/{recipe}-{balancer}/lf{fraction}/seed{seed}.tsv" % DATASET
    shell:
        "turbotrain evaluate --config {params.cfg} --checkpoint {input.checkpoint} --fusion {wildcards.fusion}"
        " --pretrain {wildcards.pretrain} --recipe {wildcards.recipe} --balancer {wildcards.balancer}"
        " --label-fraction {wildcards.fraction} --seed {wildcards.seed} --cache {params.root}"
        " --out {output} > {log} 2>&1"
