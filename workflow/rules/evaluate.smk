# Evaluation: one metrics JSON per run. Late fusion evaluates the no-fusion checkpoint per agent; a
# run whose budget repeats an earlier budget's steps evaluates that run's checkpoint (trained_path).


rule evaluate:
    conda:
        "../../environment.yml"
    input:
        checkpoint=lambda w: trained_path(w, "checkpoint"),
        summary=lambda w: trained_path(w, "summary"),
        test=cache_split(config["evaluation"]["split"]),
        stamp=lambda w: rebuild_stamp(run_of(w).metrics_path,
                                      [trained_path(w, "checkpoint"), trained_path(w, "summary")]),
    output:
        path("metrics"),
    params:
        root=lambda w, input: os.path.dirname(input.test),
        depends=lambda w: depends("evaluate", run_of(w)),
    wildcard_constraints:
        fusion=one_of(C.FUSIONS),
        seed=r"\d+",
    resources:
        **JOB_RESOURCES,
        gpu=gpu_resources(),
    log:
        path("evaluate_log"),
    benchmark:
        path("evaluate_benchmark")
    shell:
        "turbotrain evaluate --config {resources.config_file} --checkpoint {input.checkpoint}"
        " --fusion {wildcards.fusion}"
        " --pretrain {wildcards.pretrain} --recipe {wildcards.recipe} --balancer {wildcards.balancer}"
        " --label-fraction {wildcards.fraction} --seed {wildcards.seed} --budget {wildcards.budget} --cache {params.root}"
        " --out {output} --log {log} --attempt {resources.attempt}"
