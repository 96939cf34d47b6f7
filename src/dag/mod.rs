//! A small generic DAG over node indices: edges, cycle detection (reported as a path), topological order,
//! reachability and a ready queue for parallel scheduling. Pure code: no I/O, no knowledge of stages.

use std::collections::{BTreeSet, VecDeque};

/// A directed graph on nodes `0..len`; an edge `a -> b` means `b` depends on `a`.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    upstream: Vec<BTreeSet<usize>>,
    downstream: Vec<BTreeSet<usize>>,
}

impl Graph {
    pub fn new(len: usize) -> Graph {
        Graph {
            upstream: vec![BTreeSet::new(); len],
            downstream: vec![BTreeSet::new(); len],
        }
    }

    pub fn len(&self) -> usize {
        self.upstream.len()
    }

    pub fn is_empty(&self) -> bool {
        self.upstream.is_empty()
    }

    /// Adds `from -> to` (`to` depends on `from`). Self-edges are kept so that they show as cycles.
    pub fn add_edge(&mut self, from: usize, to: usize) {
        self.downstream[from].insert(to);
        self.upstream[to].insert(from);
    }

    pub fn upstream_of(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        self.upstream[node].iter().copied()
    }

    pub fn downstream_of(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        self.downstream[node].iter().copied()
    }

    /// A cycle as a closed path `[a, b, a]`, if the graph has one.
    pub fn find_cycle(&self) -> Option<Vec<usize>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnPath,
            Done,
        }
        let mut mark = vec![Mark::New; self.len()];
        for start in 0..self.len() {
            if mark[start] != Mark::New {
                continue;
            }
            // Iterative DFS: the stack holds (node, its remaining children).
            let mut path = vec![start];
            let mut stack = vec![self.downstream[start].iter().copied().collect::<Vec<_>>()];
            mark[start] = Mark::OnPath;
            while let Some(children) = stack.last_mut() {
                match children.pop() {
                    Some(next) => match mark[next] {
                        Mark::OnPath => {
                            let from = path.iter().position(|&n| n == next).unwrap_or(0);
                            let mut cycle = path[from..].to_vec();
                            cycle.push(next);
                            return Some(cycle);
                        }
                        Mark::New => {
                            mark[next] = Mark::OnPath;
                            path.push(next);
                            stack.push(self.downstream[next].iter().copied().collect());
                        }
                        Mark::Done => {}
                    },
                    None => {
                        stack.pop();
                        if let Some(node) = path.pop() {
                            mark[node] = Mark::Done;
                        }
                    }
                }
            }
        }
        None
    }

    /// Nodes in dependency order (Kahn's algorithm, lowest index first among ready nodes), or `None` when
    /// the graph has a cycle.
    pub fn topological_order(&self) -> Option<Vec<usize>> {
        let mut queue = ReadyQueue::new(self);
        let mut order = Vec::with_capacity(self.len());
        while let Some(node) = queue.pop() {
            order.push(node);
            queue.complete(node);
        }
        (order.len() == self.len()).then_some(order)
    }

    /// Every node reachable from `node` through downstream edges, excluding `node`.
    pub fn all_downstream(&self, node: usize) -> BTreeSet<usize> {
        self.reach(node, |n| &self.downstream[n])
    }

    /// Every node `node` depends on, directly or not, excluding `node`.
    pub fn all_upstream(&self, node: usize) -> BTreeSet<usize> {
        self.reach(node, |n| &self.upstream[n])
    }

    fn reach<'a>(
        &'a self,
        node: usize,
        next: impl Fn(usize) -> &'a BTreeSet<usize>,
    ) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut queue: VecDeque<usize> = next(node).iter().copied().collect();
        while let Some(n) = queue.pop_front() {
            if seen.insert(n) {
                queue.extend(next(n).iter().copied());
            }
        }
        seen.remove(&node);
        seen
    }
}

/// Scheduling state: hands out nodes whose dependencies have all completed.
#[derive(Debug)]
pub struct ReadyQueue {
    waiting_on: Vec<usize>,
    downstream: Vec<BTreeSet<usize>>,
    ready: BTreeSet<usize>,
}

impl ReadyQueue {
    pub fn new(graph: &Graph) -> ReadyQueue {
        let waiting_on: Vec<usize> = graph.upstream.iter().map(BTreeSet::len).collect();
        let ready = (0..graph.len()).filter(|&n| waiting_on[n] == 0).collect();
        ReadyQueue {
            waiting_on,
            downstream: graph.downstream.clone(),
            ready,
        }
    }

    /// The next ready node, lowest index first.
    pub fn pop(&mut self) -> Option<usize> {
        self.ready.pop_first()
    }

    /// Marks `node` finished (whatever its outcome), releasing the nodes that waited only on it.
    pub fn complete(&mut self, node: usize) {
        for &next in &self.downstream[node] {
            self.waiting_on[next] = self.waiting_on[next].saturating_sub(1);
            if self.waiting_on[next] == 0 {
                self.ready.insert(next);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(len: usize, edges: &[(usize, usize)]) -> Graph {
        let mut g = Graph::new(len);
        for &(a, b) in edges {
            g.add_edge(a, b);
        }
        g
    }

    #[test]
    fn orders_dependencies_first() {
        let g = graph(4, &[(2, 1), (1, 0), (3, 0)]);
        assert_eq!(g.topological_order(), Some(vec![2, 1, 3, 0]));
    }

    #[test]
    fn finds_a_cycle_as_a_closed_path() {
        let g = graph(4, &[(0, 1), (1, 2), (2, 1), (2, 3)]);
        let cycle = g.find_cycle().unwrap();
        assert_eq!(cycle.first(), cycle.last());
        assert_eq!(cycle.len(), 3);
        assert!(g.topological_order().is_none());
        assert!(graph(2, &[(0, 0)]).find_cycle() == Some(vec![0, 0]));
        assert!(graph(3, &[(0, 1), (0, 2), (1, 2)]).find_cycle().is_none());
    }

    #[test]
    fn reachability_both_ways() {
        let g = graph(5, &[(0, 1), (1, 2), (0, 3), (4, 3)]);
        assert_eq!(g.all_downstream(0), BTreeSet::from([1, 2, 3]));
        assert_eq!(g.all_upstream(3), BTreeSet::from([0, 4]));
    }

    #[test]
    fn ready_queue_releases_after_all_parents() {
        let g = graph(3, &[(0, 2), (1, 2)]);
        let mut q = ReadyQueue::new(&g);
        assert_eq!(q.pop(), Some(0));
        assert_eq!(q.pop(), Some(1));
        assert_eq!(q.pop(), None);
        q.complete(0);
        assert_eq!(q.pop(), None);
        q.complete(1);
        assert_eq!(q.pop(), Some(2));
    }
}
