//! `wgmesh graph`: the mesh as DOT or SVG (drawn here, no Graphviz needed), or JSON.

use wgmesh::core::graph::Graph;

use crate::emit;
use crate::shared::{Failure, emit_json};
use crate::source::{ClusterSource, Loaded};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// Graphviz DOT (`| dot -Tpng`).
    Dot,
    /// A standalone SVG picture.
    Svg,
    /// Nodes with their state and edges with the simulator's verdicts.
    Json,
}

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    source: ClusterSource,
    /// The output format.
    #[arg(long, short, value_enum, default_value_t = Format::Svg)]
    format: Format,
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    let Loaded { cluster, .. } = args.source.load()?;
    let graph = Graph::build(&cluster);
    match args.format {
        Format::Dot => emit(&graph.to_dot()),
        Format::Svg => emit(&graph.to_svg()),
        Format::Json => emit_json(&graph),
    }
}
