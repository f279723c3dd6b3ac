# Tables and figures from the metrics files and the training logs.


rule table:
    conda:
        "../../environment.yml"
    input:
        metrics=lambda w: [r.metrics_path for r in C.expand_runs(config, w.table)],
        stamp=lambda w: rebuild_stamp(C.template("table", table=w.table),
                                      [r.metrics_path for r in C.expand_runs(config, w.table)]),
    output:
        csv=report(C.PATHS["table"], category="Tables", caption="../report/table.rst"),
        md=C.PATHS["table_md"],
    params:
        depends=lambda w: depends("table", w.table),
    wildcard_constraints:
        table=one_of(C.TABLES),
    resources:
        **JOB_RESOURCES,
    log:
        C.PATHS["table_log"],
    shell:
        "turbotrain tables --config {resources.config_file} --table {wildcards.table} --metrics {input.metrics}"
        " --out {output.csv}"
        " --log {log} --attempt {resources.attempt}"


rule figure:
    conda:
        "../../environment.yml"
    input:
        metrics=[r.metrics_path for r in RUNS],
        stamp=lambda w: rebuild_stamp(C.template("figure", figure=w.figure), [r.metrics_path for r in RUNS]),
    output:
        report(C.PATHS["figure"], category="Figures", caption="../report/figure.rst"),
    params:
        depends=lambda w: depends("figure", w.figure),
    wildcard_constraints:
        figure=one_of(C.FIGURES),
    resources:
        **JOB_RESOURCES,
    log:
        C.PATHS["figure_log"],
    shell:
        "turbotrain figures --config {resources.config_file} --figure {wildcards.figure} --metrics {input.metrics}"
        " --out {output}"
        " --log {log} --attempt {resources.attempt}"
