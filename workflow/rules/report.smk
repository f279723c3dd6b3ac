# Tables and figures from the metrics files and the training logs.


rule table:
    conda:
        "../../environment.yml"
    input:
        lambda w: [r.metrics_path for r in expand_runs(config, w.table)],
    output:
        csv=report("results/tables/{table}.csv", category="Tables", caption="../report/table.rst"),
        md="results/tables/{table}.md",
    params:
        cfg=EFFECTIVE_CONFIG,
        depends=section_hash("evaluation"),
    wildcard_constraints:
        table="main|ablation|efficiency|data_efficiency|transfer",
    log:
        "logs/tables/{table}.log",
    shell:
        "turbotrain tables --config {params.cfg} --table {wildcards.table} --metrics {input} --out {output.csv} > {log} 2>&1"


rule figure:
    conda:
        "../../environment.yml"
    input:
        lambda w: [r.metrics_path for r in RUNS],
    output:
        report("results/figures/{figure}.png", category="Figures", caption="../report/figure.rst"),
    params:
        cfg=EFFECTIVE_CONFIG,
    wildcard_constraints:
        figure="learning_curves|gradient_conflict|ap_vs_time|data_efficiency|qualitative_bev|trajectory_pretraining",
    log:
        "logs/figures/{figure}.log",
    shell:
        "turbotrain figures --config {params.cfg} --figure {wildcards.figure} --metrics {input} --out {output} > {log} 2>&1"
