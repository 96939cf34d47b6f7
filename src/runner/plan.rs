//! `medallion plan`: the stage DAG in dependency order with what each stage reads and writes, as text,
//! Mermaid or Graphviz dot.

use std::fmt::Write;

use crate::config::{Pipeline, StageInput};

pub fn text(pipeline: &Pipeline) -> String {
    let mut out = format!(
        "pipeline `{}` ({} stages, lake `{}`)\n",
        pipeline.name,
        pipeline.stages.len(),
        pipeline.lake
    );
    let order = pipeline.graph.topological_order().unwrap_or_default();
    for (step, &index) in order.iter().enumerate() {
        let stage = &pipeline.stages[index];
        let reads = match &stage.input {
            StageInput::Ingest { source } => {
                let path = pipeline
                    .source(source)
                    .map(|s| s.path.to_string())
                    .unwrap_or_default();
                format!("landing `{source}` ({path})")
            }
            StageInput::Sql { file, reads, .. } => {
                let tables: Vec<String> = reads.iter().map(ToString::to_string).collect();
                format!("{} via {}", tables.join(", "), file.display())
            }
        };
        let after: Vec<&str> = pipeline
            .graph
            .upstream_of(index)
            .map(|i| pipeline.stages[i].name.as_str())
            .collect();
        let _ = writeln!(
            out,
            "{:>2}. {} [{}]\n    reads:  {}\n    writes: {} ({}{})",
            step + 1,
            stage.name,
            stage.layer,
            reads,
            stage.target,
            stage.write.name(),
            if stage.partition_by.is_empty() {
                String::new()
            } else {
                format!(", partitioned by {}", stage.partition_by.join(", "))
            }
        );
        if !after.is_empty() {
            let _ = writeln!(out, "    after:  {}", after.join(", "));
        }
    }
    out
}

pub fn mermaid(pipeline: &Pipeline) -> String {
    let mut out = String::from("flowchart LR\n");
    for stage in &pipeline.stages {
        let _ = writeln!(
            out,
            "    {}[\"{}<br/>{} ({})\"]",
            stage.name,
            stage.name,
            stage.target,
            stage.write.name()
        );
    }
    for (index, stage) in pipeline.stages.iter().enumerate() {
        for up in pipeline.graph.upstream_of(index) {
            let _ = writeln!(out, "    {} --> {}", pipeline.stages[up].name, stage.name);
        }
    }
    out
}

pub fn dot(pipeline: &Pipeline) -> String {
    let mut out = format!("digraph \"{}\" {{\n    rankdir=LR;\n", pipeline.name);
    for stage in &pipeline.stages {
        let _ = writeln!(
            out,
            "    \"{}\" [shape=box, label=\"{}\\n{} ({})\"];",
            stage.name,
            stage.name,
            stage.target,
            stage.write.name()
        );
    }
    for (index, stage) in pipeline.stages.iter().enumerate() {
        for up in pipeline.graph.upstream_of(index) {
            let _ = writeln!(
                out,
                "    \"{}\" -> \"{}\";",
                pipeline.stages[up].name, stage.name
            );
        }
    }
    out.push_str("}\n");
    out
}
