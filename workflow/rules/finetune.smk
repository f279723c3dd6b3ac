# Fine-tuning: one job per run of the grid (multistage runs all their stages inside the job, each
# stage resuming from the previous stage's checkpoint, so a requeued job continues where it stopped).


rule finetune:
    conda:
        "../../environment.yml"
    input:
        train=cache_split("train"),
        # the training curve scores `evaluation.curve_samples` val samples at each checkpoint
        val=cache_split("val"),
        pretrained=pretrained_input,
    output:
        checkpoint="runs/finetune/%s/{fusion}/{pretrain}/{recipe}-{balancer}/lf{fraction}/seed{seed}/final.pt" % DATASET,
        summary="runs/finetune/%s/{fusion}/{pretrain}/{recipe}-{balancer}/lf{fraction}/seed{seed}/summary.json" % DATASET,
    params:
        cfg=EFFECTIVE_CONFIG,
        root=lambda w, input: os.path.dirname(input.train),
        run_dir=lambda w, output: os.path.dirname(output.checkpoint),
        pretrained=lambda w, input: f"--pretrained {input.pretrained}" if input.pretrained else "",
        launch=launcher,
        depends=section_hash("train", "finetune", "model", "grid", "classes"),
        curve=curve_hash(),
    wildcard_constraints:
        fusion="none|early|fcooper|attfuse|v2xvit",
        recipe="multistage|joint",
        seed=r"\d+",
    resources:
        **TRAINING_RESOURCES,
    retries: 2
    log:
        "logs/finetune/%s/{fusion}/{pretrain}/{recipe}-{balancer}/lf{fraction}/seed{seed}.log" % DATASET,
    benchmark:
        "benchmarks/finetune/%s/{fusion}/{pretrain}/{recipe}-{balancer}/lf{fraction}/seed{seed}.tsv" % DATASET
    shell:
        "{params.launch} train --config {params.cfg} --fusion {wildcards.fusion} --pretrain {wildcards.pretrain}"
        " --recipe {wildcards.recipe} --balancer {wildcards.balancer} --label-fraction {wildcards.fraction}"
        " --seed {wildcards.seed} --cache {params.root} {params.pretrained} --out {params.run_dir} > {log} 2>&1"
