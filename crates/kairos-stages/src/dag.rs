//! yip's ordering model: steps become named ops with weak dependencies, run in layers.
//!
//! Inside a file each step follows the previous one unless it says `after:`; every op of a
//! file follows every op of the previous file that has no `after:`. A failed op never stops
//! its dependents.

use std::collections::HashMap;

use kairos_config::types::Step;

use kairos_config::validate::Level;

use crate::loader::YipConfig;

#[derive(Debug, Clone)]
pub struct Op {
    pub name: String,
    pub step: Step,
    pub deps: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub ops: Vec<Op>,
    /// What was not applied: steps that could not be read, `after` targets that do not exist.
    pub problems: Vec<String>,
    /// What was applied without something: unknown keys.
    pub warnings: Vec<String>,
}

impl Graph {
    /// Builds the graph of `stage` over documents read from one source (a directory walk).
    pub fn build(configs: &[YipConfig], stage: &str) -> Graph {
        let mut g = Graph::default();
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut prev_file: Vec<String> = Vec::new();
        for cfg in configs {
            for p in cfg
                .problems
                .iter()
                .filter(|p| p.stage.as_deref() == Some(stage))
            {
                match p.level {
                    Level::Error => g.problems.push(p.text.clone()),
                    _ => g.warnings.push(p.text.clone()),
                }
            }
            let Some(steps) = cfg.stages.get(stage) else {
                continue;
            };
            let names: Vec<String> = steps
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    s.name
                        .clone()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| i.to_string())
                })
                .collect();
            let clash = names
                .iter()
                .enumerate()
                .any(|(i, n)| names[..i].contains(n));
            let mut this_file = Vec::new();
            let mut prev_op: Option<String> = None;
            for (i, (step, base)) in steps.iter().zip(&names).enumerate() {
                let mut name = if clash {
                    format!("{}.{base}.{i}", cfg.name)
                } else {
                    format!("{}.{base}", cfg.name)
                };
                let count = seen.entry(name.clone()).or_insert(0);
                *count += 1;
                if *count > 1 {
                    name = format!("{name}.{}", *count - 1);
                }
                let deps = if step.after.is_empty() {
                    let mut d = prev_file.clone();
                    d.extend(prev_op.clone());
                    this_file.push(name.clone());
                    d
                } else {
                    step.after.iter().map(|a| a.name.clone()).collect()
                };
                prev_op = Some(name.clone());
                g.ops.push(Op {
                    name,
                    step: step.clone(),
                    deps,
                });
            }
            if !this_file.is_empty() {
                prev_file = this_file;
            }
        }
        let known: Vec<String> = g.ops.iter().map(|o| o.name.clone()).collect();
        for op in &mut g.ops {
            let missing: Vec<String> = op
                .deps
                .iter()
                .filter(|d| !known.contains(d))
                .cloned()
                .collect();
            for m in missing {
                g.problems.push(format!(
                    "{}: `after` names {m:?}, which is not a step of this stage; ignoring it",
                    op.name
                ));
                op.deps.retain(|d| *d != m);
            }
        }
        if let Some(cycle) = g.find_cycle() {
            g.problems.push(format!(
                "steps {} depend on each other in a cycle; they run in file order",
                cycle.join(" → ")
            ));
        }
        g
    }

    /// Op name → position in `ops`.
    fn index(&self) -> HashMap<&str, usize> {
        self.ops
            .iter()
            .enumerate()
            .map(|(i, o)| (o.name.as_str(), i))
            .collect()
    }

    fn find_cycle(&self) -> Option<Vec<String>> {
        let index = self.index();
        // 0 = unvisited, 1 = on the stack, 2 = done
        let mut state = vec![0u8; self.ops.len()];
        fn visit(
            i: usize,
            g: &Graph,
            index: &HashMap<&str, usize>,
            state: &mut [u8],
            path: &mut Vec<usize>,
        ) -> Option<Vec<String>> {
            state[i] = 1;
            path.push(i);
            for d in &g.ops[i].deps {
                let Some(&j) = index.get(d.as_str()) else {
                    continue;
                };
                if state[j] == 1 {
                    let start = path.iter().position(|&p| p == j).unwrap_or(0);
                    return Some(
                        path[start..]
                            .iter()
                            .map(|&k| g.ops[k].name.clone())
                            .collect(),
                    );
                }
                if state[j] == 0
                    && let Some(c) = visit(j, g, index, state, path)
                {
                    return Some(c);
                }
            }
            path.pop();
            state[i] = 2;
            None
        }
        (0..self.ops.len()).find_map(|i| {
            if state[i] == 0 {
                visit(i, self, &index, &mut state, &mut Vec::new())
            } else {
                None
            }
        })
    }

    /// The execution layers: `["init"]` then each level of ops, in declaration order.
    pub fn layers(&self) -> Vec<Vec<String>> {
        let index = self.index();
        let mut level: Vec<Option<usize>> = vec![None; self.ops.len()];
        fn depth(
            i: usize,
            g: &Graph,
            index: &HashMap<&str, usize>,
            level: &mut Vec<Option<usize>>,
            stack: &mut Vec<usize>,
        ) -> usize {
            if let Some(l) = level[i] {
                return l;
            }
            if stack.contains(&i) {
                return 1; // a cycle: break it here
            }
            stack.push(i);
            let l = 1 + g.ops[i]
                .deps
                .iter()
                .filter_map(|d| index.get(d.as_str()))
                .map(|&j| depth(j, g, index, level, stack))
                .max()
                .unwrap_or(0);
            stack.pop();
            level[i] = Some(l);
            l
        }
        let mut stack = Vec::new();
        for i in 0..self.ops.len() {
            depth(i, self, &index, &mut level, &mut stack);
        }
        let max = level.iter().flatten().max().copied().unwrap_or(0);
        let mut layers = vec![vec!["init".to_string()]];
        for l in 1..=max {
            let layer: Vec<String> = self
                .ops
                .iter()
                .zip(&level)
                .filter(|(_, lv)| **lv == Some(l))
                .map(|(o, _)| o.name.clone())
                .collect();
            if !layer.is_empty() {
                layers.push(layer);
            }
        }
        layers
    }

    /// Ops in the order they run.
    pub fn ordered(&self) -> Vec<&Op> {
        let by_name: HashMap<&str, &Op> = self.ops.iter().map(|o| (o.name.as_str(), o)).collect();
        self.layers()
            .iter()
            .skip(1)
            .flatten()
            .filter_map(|n| by_name.get(n.as_str()).copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::load_text;

    fn layers(docs: &[(&str, &str)], stage: &str) -> Vec<Vec<String>> {
        let cfgs: Vec<_> = docs.iter().map(|(n, t)| load_text(t, n).unwrap()).collect();
        Graph::build(&cfgs, stage).layers()
    }

    #[test]
    fn unnamed_and_duplicate_steps_are_sequential() {
        let l = layers(
            &[(
                "f",
                "stages:\n  x:\n  - commands: [a]\n  - commands: [b]\n  - commands: [c]\n  - commands: [d]\n",
            )],
            "x",
        );
        assert_eq!(l.len(), 5);
        assert_eq!(l[1], vec!["f.0"]);
        let l = layers(
            &[(
                "f",
                "stages:\n  x:\n  - name: s\n  - name: s\n  - name: s\n  - name: t\n",
            )],
            "x",
        );
        assert_eq!(l.len(), 5, "{l:?}");
        assert_eq!(l[1], vec!["f.s.0"]);
    }

    #[test]
    fn files_follow_each_other_and_after_overrides() {
        let first = "name: first\nstages:\n  rootfs:\n  - name: rootfs\n  - name: rootfs 2\n";
        let second = "name: second\nstages:\n  rootfs:\n  - name: a\n  - name: b\n";
        let l = layers(&[("1", first), ("2", second)], "rootfs");
        assert_eq!(
            l,
            vec![
                vec!["init"],
                vec!["first.rootfs"],
                vec!["first.rootfs 2"],
                vec!["second.a"],
                vec!["second.b"]
            ]
        );
        let one = "name: one\nstages:\n  s:\n  - name: x\n    after: [{name: test.test}]\n";
        let two = "name: test\nstages:\n  s:\n  - name: test\n";
        let l = layers(&[("1", one), ("2", two)], "s");
        assert_eq!(l, vec![vec!["init"], vec!["test.test"], vec!["one.x"]]);
    }
}
