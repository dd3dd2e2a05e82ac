//! The compatibility corpus: every `tests/corpus/*.case` file is a Kairos behaviour, run
//! through the real `kairos-agent` binary against a fresh temp root.
//!
//! A case file is a header (`cmd: …`, optional `before: …` commands run first in order (as a
//! boot runs `initramfs` before `boot`), `cmdline: …`, `requires: root`), then
//! `--- file PATH [MODE]` sections laid into the root, then `--- expect` lines:
//! `exit N`, `stdout has T`, `stdout lacks T`, `stderr has T`, `content PATH T`,
//! `contains PATH T`, `lacks PATH T`, `match PATH REGEX`, `mode PATH OCTAL`, `owner PATH U:G`,
//! `symlink PATH TARGET`, `absent PATH`, `dir PATH`, `json POINTER VALUE`, `idempotent`.
//! `T` may use `\n`; `{root}` in commands is the temp root.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

struct Case {
    name: String,
    cmd: String,
    before: Vec<String>,
    cmdline: Option<String>,
    stdin: Option<String>,
    needs_root: bool,
    files: Vec<(String, Option<u32>, String)>,
    expect: Vec<String>,
}

fn parse_case(name: &str, text: &str) -> Case {
    let mut case = Case {
        name: name.into(),
        cmd: String::new(),
        before: Vec::new(),
        cmdline: None,
        stdin: None,
        needs_root: false,
        files: Vec::new(),
        expect: Vec::new(),
    };
    let mut section: Option<(String, Option<u32>, Vec<String>)> = None;
    let mut in_expect = false;
    let flush = |section: &mut Option<(String, Option<u32>, Vec<String>)>, case: &mut Case| {
        if let Some((p, m, lines)) = section.take() {
            case.files
                .push((p, m, lines.iter().map(|l| format!("{l}\n")).collect()));
        }
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("--- ") {
            flush(&mut section, &mut case);
            let mut parts = rest.split_whitespace();
            match parts.next() {
                Some("file") => {
                    let path = parts.next().expect("file path").to_string();
                    let mode = parts
                        .next()
                        .map(|m| u32::from_str_radix(m, 8).expect("octal mode"));
                    section = Some((path, mode, Vec::new()));
                    in_expect = false;
                }
                Some("expect") => in_expect = true,
                other => panic!("{name}: unknown section {other:?}"),
            }
            continue;
        }
        if in_expect {
            let l = line.trim();
            if !l.is_empty() && !l.starts_with('#') {
                case.expect.push(l.to_string());
            }
        } else if let Some((_, _, lines)) = &mut section {
            lines.push(line.to_string());
        } else if let Some(c) = line.strip_prefix("before:") {
            case.before.push(c.trim().to_string());
        } else if let Some(c) = line.strip_prefix("cmd:") {
            case.cmd = c.trim().to_string();
        } else if let Some(c) = line.strip_prefix("cmdline:") {
            case.cmdline = Some(c.trim().to_string());
        } else if let Some(c) = line.strip_prefix("stdin:") {
            case.stdin = Some(unescape(c.trim()));
        } else if line.trim() == "requires: root" {
            case.needs_root = true;
        }
    }
    flush(&mut section, &mut case);
    assert!(!case.cmd.is_empty(), "{name}: no cmd");
    assert!(!case.expect.is_empty(), "{name}: no expectations");
    case
}

fn unescape(s: &str) -> String {
    s.replace("\\n", "\n").replace("\\t", "\t")
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(case: &Case, root: &Path) -> Output {
    for b in &case.before {
        let out = run_one(case, b, root);
        assert_eq!(out.code, 0, "{}: `{b}` failed: {}", case.name, out.stderr);
    }
    run_one(case, &case.cmd, root)
}

fn run_one(case: &Case, cmd: &str, root: &Path) -> Output {
    let cmd = cmd.replace("{root}", &root.display().to_string());
    let mut args = shlex::split(&cmd).expect("cmd quoting");
    if !args.iter().any(|a| a == "--root") {
        args.extend(["--root".to_string(), root.display().to_string()]);
    }
    if let Some(c) = &case.cmdline {
        args.extend(["--cmdline".to_string(), c.clone()]);
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_kairos-agent"))
        .args(&args)
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kairos-agent");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        if let Some(s) = &case.stdin {
            stdin.write_all(s.as_bytes()).expect("write stdin");
        }
    }
    let out = child.wait_with_output().expect("wait");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Everything observable about a tree, to prove a re-run changed nothing.
fn snapshot(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).expect("stat");
        let mut line = format!(
            "{} {:o} {}:{} {}",
            p.display(),
            m.mode(),
            m.uid(),
            m.gid(),
            m.mtime_nsec() + m.mtime() * 1_000_000_000
        );
        if m.is_symlink() {
            line.push_str(&format!(" -> {}", fs::read_link(&p).unwrap().display()));
        } else if m.is_file() {
            line.push_str(&format!(" {:?}", fs::read(&p).unwrap()));
        } else if m.is_dir() {
            for e in fs::read_dir(&p).unwrap().flatten() {
                stack.push(e.path());
            }
        }
        out.push(line);
    }
    out.sort();
    out
}

fn check(case: &Case, root: &Path, out: &Output) -> Vec<String> {
    let mut fails = Vec::new();
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    for e in &case.expect {
        let (verb, rest) = e.split_once(' ').unwrap_or((e.as_str(), ""));
        let (arg, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        let ok = match verb {
            "exit" => out.code == arg.parse::<i32>().expect("exit code"),
            "stdout" | "stderr" => {
                let stream = if verb == "stdout" {
                    &out.stdout
                } else {
                    &out.stderr
                };
                let text = unescape(tail);
                match arg {
                    "has" => stream.contains(&text),
                    "lacks" => !stream.contains(&text),
                    other => panic!("{}: bad stream check {other}", case.name),
                }
            }
            "content" => fs::read_to_string(at(arg)).ok() == Some(unescape(tail)),
            "contains" => fs::read_to_string(at(arg)).is_ok_and(|c| c.contains(&unescape(tail))),
            "lacks" => fs::read_to_string(at(arg)).is_ok_and(|c| !c.contains(&unescape(tail))),
            "match" => {
                let re = regex::Regex::new(tail).expect("regex");
                fs::read_to_string(at(arg)).is_ok_and(|c| c.lines().any(|l| re.is_match(l)))
            }
            "mode" => fs::metadata(at(arg)).is_ok_and(|m| {
                m.permissions().mode() & 0o7777 == u32::from_str_radix(tail, 8).unwrap()
            }),
            "owner" => fs::symlink_metadata(at(arg))
                .is_ok_and(|m| format!("{}:{}", m.uid(), m.gid()) == tail),
            "symlink" => fs::read_link(at(arg)).is_ok_and(|t| t == Path::new(tail)),
            "absent" => fs::symlink_metadata(at(arg)).is_err(),
            "dir" => at(arg).is_dir(),
            "json" => {
                let v: serde_json::Value = match serde_json::from_str(&out.stdout) {
                    Ok(v) => v,
                    Err(err) => {
                        fails.push(format!("stdout is not JSON ({err})"));
                        continue;
                    }
                };
                let want: serde_json::Value =
                    serde_json::from_str(tail).expect("expected JSON value");
                v.pointer(arg) == Some(&want)
            }
            "idempotent" => {
                let before = snapshot(root);
                std::thread::sleep(std::time::Duration::from_millis(20));
                let again = run(case, root);
                let after = snapshot(root);
                if again.code != out.code {
                    fails.push(format!(
                        "second run exited {} (first {})",
                        again.code, out.code
                    ));
                }
                let diff: Vec<_> = after.iter().filter(|l| !before.contains(l)).collect();
                if !diff.is_empty() {
                    fails.push(format!("second run changed: {diff:?}"));
                }
                true
            }
            other => panic!("{}: unknown expectation {other}", case.name),
        };
        if !ok {
            fails.push(format!("failed: {e}"));
        }
    }
    fails
}

#[test]
fn corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/corpus");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("tests/corpus")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "case"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 50,
        "the corpus must hold at least 50 cases, found {}",
        files.len()
    );
    let is_root = rustix::process::geteuid().is_root();
    let mut failures = Vec::new();
    let (mut passed, mut skipped) = (0, 0);
    for f in &files {
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        let case = parse_case(&name, &fs::read_to_string(f).unwrap());
        if case.needs_root && !is_root {
            eprintln!("skip {name}: needs root");
            skipped += 1;
            continue;
        }
        let tmp = tempfile::tempdir().unwrap();
        for (p, mode, content) in &case.files {
            let path = tmp.path().join(p.trim_start_matches('/'));
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, content).unwrap();
            if let Some(m) = mode {
                fs::set_permissions(&path, fs::Permissions::from_mode(*m)).unwrap();
            }
        }
        let out = run(&case, tmp.path());
        let fails = check(&case, tmp.path(), &out);
        if fails.is_empty() {
            passed += 1;
        } else {
            failures.push(format!(
                "{name}:\n  {}\n  exit: {}\n  stdout: {}\n  stderr: {}",
                fails.join("\n  "),
                out.code,
                out.stdout.trim_end().replace('\n', "\n          "),
                out.stderr.trim_end().replace('\n', "\n          ")
            ));
        }
    }
    eprintln!(
        "corpus: {passed} passed, {} failed, {skipped} skipped",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} corpus case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
