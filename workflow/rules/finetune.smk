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
        stamp=lambda w: rebuild_stamp(run_of(w).path("checkpoint"), [pretrained_input(w)]),
    output:
        checkpoint=path("checkpoint"),
        summary=path("summary"),
    params:
        root=lambda w, input: os.path.dirname(input.train),
        run_dir=lambda w, output: os.path.dirname(output.checkpoint),
        pretrained=lambda w, input: f"--pretrained {input.pretrained}" if input.pretrained else "",
        launch=launcher,
        depends=lambda w: depends("finetune", run_of(w)),
    wildcard_constraints:
        fusion=one_of(C.TRAINED_FUSIONS),
        recipe=one_of(C.RECIPES),
        seed=r"\d+",
    resources:
        **TRAINING_RESOURCES,
    log:
        path("finetune_log"),
    benchmark:
        path("finetune_benchmark")
    shell:
        "{params.launch} train --config {resources.config_file} --fusion {wildcards.fusion}"
        " --pretrain {wildcards.pretrain}"
        " --recipe {wildcards.recipe} --balancer {wildcards.balancer} --label-fraction {wildcards.fraction}"
        " --seed {wildcards.seed} --budget {wildcards.budget} --cache {params.root} {params.pretrained} --out {params.run_dir}"
        " --log {log} --attempt {resources.attempt}"
