# Evaluation: one metrics JSON per run. Late fusion evaluates the no-fusion checkpoint per agent.


def trained_checkpoint(w):
    return f"{run_from_wildcards(w).train_dir}/final.pt"


rule evaluate:
    input:
        checkpoint=trained_checkpoint,
        test=cache_split(config["evaluation"]["split"]),
    output:
        "results/metrics/%s/{fusion}/{pretrain}/{recipe}-{balancer}/lf{fraction}/seed{seed}.json" % DATASET,
    params:
        cfg=EFFECTIVE_CONFIG,
        root=f"{config['cache']['root']}/{DATASET}",
        train_bench=lambda w: "benchmarks/finetune/%s/%s/%s/%s-%s/lf%s/seed%s.tsv"
        % (DATASET, run_from_wildcards(w).trained_fusion, w.pretrain, w.recipe, w.balancer, w.fraction, w.seed),
        depends=section_hash("evaluation"),
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
