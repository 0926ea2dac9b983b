//! The stage graph: edges come from the typed input fields of each stage
//! (upstream -> downstream). Built with petgraph; a cycle is refused naming
//! every stage on it.

use std::collections::{BTreeMap, BTreeSet};

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;

use crate::experiment::{ErrorKind, Experiment, ExperimentError};

pub struct Dag {
    graph: DiGraph<String, String>,
    index: BTreeMap<String, NodeIndex>,
    order: Vec<String>,
}

impl Dag {
    /// Build the graph; references were checked by the loader, cycles here.
    pub fn build(exp: &Experiment) -> Result<Dag, ExperimentError> {
        let mut graph = DiGraph::new();
        let index: BTreeMap<String, NodeIndex> = exp
            .stages
            .keys()
            .map(|name| (name.clone(), graph.add_node(name.clone())))
            .collect();
        for (name, stage) in &exp.stages {
            for input in stage.settings.inputs() {
                if let Some(up) = input.upstream().and_then(|u| index.get(u)) {
                    graph.add_edge(*up, index[name], input.field.clone());
                }
            }
        }
        let mut dag = Dag {
            graph,
            index,
            order: Vec::new(),
        };
        if let Some(cycle) = dag.find_cycle() {
            let first = &exp.stages[&cycle[0]];
            let mut path = cycle.clone();
            path.push(cycle[0].clone());
            return Err(ExperimentError::new(
                ErrorKind::Cycle,
                Some(first.at.clone()),
                format!(
                    "stages form a cycle: {} ({})",
                    cycle
                        .iter()
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    path.join(" -> ")
                ),
            )
            .with_help("a stage cannot depend on its own output: remove one of these references"));
        }
        dag.order = dag.topological_order();
        Ok(dag)
    }

    /// A cycle as a list of stage names in edge order, if there is one.
    fn find_cycle(&self) -> Option<Vec<String>> {
        let mut sccs = tarjan_scc(&self.graph);
        sccs.sort_by_key(|scc| scc.iter().map(|n| self.graph[*n].clone()).min());
        for scc in sccs {
            let self_loop = scc.len() == 1 && self.graph.contains_edge(scc[0], scc[0]);
            if scc.len() < 2 && !self_loop {
                continue;
            }
            let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
            let start = *scc
                .iter()
                .min_by_key(|n| &self.graph[**n])
                .expect("non-empty");
            // Walk edges inside the component until we are back at the start.
            let mut path = vec![start];
            let mut seen = BTreeSet::from([start]);
            let mut at = start;
            loop {
                let mut next: Vec<NodeIndex> = self
                    .graph
                    .neighbors_directed(at, Direction::Outgoing)
                    .filter(|n| members.contains(n))
                    .collect();
                next.sort_by_key(|n| &self.graph[*n]);
                if next.contains(&start) || next.is_empty() {
                    break;
                }
                match next.into_iter().find(|n| !seen.contains(n)) {
                    Some(n) => {
                        seen.insert(n);
                        path.push(n);
                        at = n;
                    }
                    None => break,
                }
            }
            if path.len() < members.len() {
                // The walk took a shortcut: name every stage of the component.
                let mut all: Vec<NodeIndex> = members.into_iter().collect();
                all.sort_by_key(|n| &self.graph[*n]);
                path = all;
            }
            return Some(path.into_iter().map(|n| self.graph[n].clone()).collect());
        }
        None
    }

    /// Kahn's algorithm, ties broken by name so the order is reproducible.
    fn topological_order(&self) -> Vec<String> {
        let mut indegree: BTreeMap<NodeIndex, usize> = self
            .graph
            .node_indices()
            .map(|n| {
                (
                    n,
                    self.graph
                        .neighbors_directed(n, Direction::Incoming)
                        .count(),
                )
            })
            .collect();
        let mut ready: BTreeSet<(String, NodeIndex)> = indegree
            .iter()
            .filter(|(_, d)| **d == 0)
            .map(|(n, _)| (self.graph[*n].clone(), *n))
            .collect();
        let mut order = Vec::new();
        while let Some((name, n)) = ready.pop_first() {
            order.push(name);
            for m in self.graph.neighbors_directed(n, Direction::Outgoing) {
                let d = indegree.get_mut(&m).expect("node");
                *d -= 1;
                if *d == 0 {
                    ready.insert((self.graph[m].clone(), m));
                }
            }
        }
        order
    }

    /// Stage names, upstream before downstream.
    pub fn order(&self) -> &[String] {
        &self.order
    }

    /// (field, upstream stage) pairs of a stage, sorted.
    pub fn upstream(&self, stage: &str) -> Vec<(String, String)> {
        let mut ups: Vec<(String, String)> = self
            .graph
            .edges_directed(self.index[stage], Direction::Incoming)
            .map(|e| {
                use petgraph::visit::EdgeRef;
                (e.weight().clone(), self.graph[e.source()].clone())
            })
            .collect();
        ups.sort();
        ups
    }

    /// `stage` and everything it depends on, directly or not.
    pub fn with_ancestors(&self, stage: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![self.index[stage]];
        while let Some(n) = stack.pop() {
            if seen.insert(self.graph[n].clone()) {
                stack.extend(self.graph.neighbors_directed(n, Direction::Incoming));
            }
        }
        seen
    }

    pub fn contains(&self, stage: &str) -> bool {
        self.index.contains_key(stage)
    }

    /// The graph as indented text, one stage a line with its inputs.
    pub fn to_text(&self, exp: &Experiment) -> String {
        let mut out = String::new();
        for name in &self.order {
            let kind = exp.stages[name].settings.kind();
            let ups = self.upstream(name);
            if ups.is_empty() {
                out.push_str(&format!("{name} ({kind})\n"));
            } else {
                let from: Vec<String> = ups.iter().map(|(f, s)| format!("{s} [{f}]")).collect();
                out.push_str(&format!("{name} ({kind}) <- {}\n", from.join(", ")));
            }
        }
        out
    }

    /// The graph in Graphviz dot.
    pub fn to_dot(&self, exp: &Experiment) -> String {
        let mut out = format!(
            "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];\n",
            exp.name
        );
        for name in &self.order {
            let kind = exp.stages[name].settings.kind();
            out.push_str(&format!("  \"{name}\" [label=\"{name}\\n({kind})\"];\n"));
        }
        for name in &self.order {
            for (field, up) in self.upstream(name) {
                out.push_str(&format!("  \"{up}\" -> \"{name}\" [label=\"{field}\"];\n"));
            }
        }
        out.push_str("}\n");
        out
    }
}
