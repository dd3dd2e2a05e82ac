//! Lexing, parsing and evaluation of template text.

use serde_json::Value;

use crate::{Error, Options, funcs};

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    Action(Pipeline),
    If(Vec<(Pipeline, Vec<Node>)>, Vec<Node>),
    Range(
        Option<String>,
        Option<String>,
        Pipeline,
        Vec<Node>,
        Vec<Node>,
    ),
    With(Pipeline, Vec<Node>, Vec<Node>),
}

#[derive(Debug, Clone)]
struct Pipeline {
    decl: Option<String>,
    cmds: Vec<Vec<Operand>>,
}

#[derive(Debug, Clone)]
enum Operand {
    Field(Vec<String>),
    Var(String, Vec<String>),
    Lit(Value),
    Func(String),
    Sub(Box<Pipeline>, Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Dot(Vec<String>),
    Var(String, Vec<String>),
    Ident(String),
    Str(String),
    Num(Value),
    Pipe,
    LParen,
    RParen(Vec<String>),
    Declare,
    Comma,
}

/// A parsed template, reusable across renders.
#[derive(Debug, Clone)]
pub struct Template {
    nodes: Vec<Node>,
}

/// Raw pieces: text and action source, after trim markers are applied.
enum Piece {
    Text(String),
    Action(usize, String),
}

fn split(src: &str) -> Result<Vec<Piece>, Error> {
    let mut out = Vec::new();
    let mut rest = src;
    let mut base = 0;
    while let Some(i) = rest.find("{{") {
        let mut text = rest[..i].to_string();
        let mut inner_start = i + 2;
        if rest[inner_start..].starts_with("- ")
            || rest[inner_start..].starts_with("-\t")
            || rest[inner_start..].starts_with("-\n")
        {
            text = text.trim_end().to_string();
            inner_start += 1;
        }
        out.push(Piece::Text(text));
        let after = &rest[inner_start..];
        let close = if after.trim_start().starts_with("/*") {
            let c = after.find("*/").ok_or(Error::Parse {
                pos: base + i,
                msg: "unclosed comment".into(),
            })?;
            after[c..].find("}}").map(|j| c + j)
        } else {
            find_close(after)
        }
        .ok_or(Error::Parse {
            pos: base + i,
            msg: "unclosed action: missing }}".into(),
        })?;
        let mut inner = &after[..close];
        let mut trim_right = false;
        if inner.ends_with(" -") || inner.ends_with("\t-") || inner.ends_with("\n-") {
            inner = &inner[..inner.len() - 1];
            trim_right = true;
        }
        let inner_trimmed = inner.trim();
        if !(inner_trimmed.starts_with("/*") && inner_trimmed.ends_with("*/")) {
            out.push(Piece::Action(base + i, inner.to_string()));
        }
        let consumed = inner_start + close + 2;
        rest = &rest[consumed..];
        base += consumed;
        if trim_right {
            let t = rest.trim_start();
            base += rest.len() - t.len();
            rest = t;
        }
    }
    out.push(Piece::Text(rest.to_string()));
    Ok(out)
}

/// Finds `}}` outside string literals.
fn find_close(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'`' => {
                i += 1;
                while i < b.len() && b[i] != b'`' {
                    i += 1;
                }
            }
            b'}' if b.get(i + 1) == Some(&b'}') => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

fn fields(s: &str) -> Vec<String> {
    s.split('.')
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect()
}

fn lex(src: &str, pos: usize) -> Result<Vec<Tok>, Error> {
    let err = |msg: String| Error::Parse { pos, msg };
    let c: Vec<char> = src.chars().collect();
    let mut i = 0;
    let mut toks = Vec::new();
    let ident_char = |ch: char| ch.is_alphanumeric() || ch == '_' || ch == '.' || ch == '-';
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        match ch {
            '|' => {
                toks.push(Tok::Pipe);
                i += 1
            }
            '(' => {
                toks.push(Tok::LParen);
                i += 1
            }
            ')' => {
                i += 1;
                let s = i;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_' || c[i] == '.') {
                    i += 1;
                }
                toks.push(Tok::RParen(fields(&c[s..i].iter().collect::<String>())));
            }
            ',' => {
                toks.push(Tok::Comma);
                i += 1
            }
            ':' if c.get(i + 1) == Some(&'=') => {
                toks.push(Tok::Declare);
                i += 2
            }
            '=' => {
                toks.push(Tok::Declare);
                i += 1
            }
            '.' => {
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_' || c[i] == '.') {
                    i += 1;
                }
                toks.push(Tok::Dot(fields(&c[start..i].iter().collect::<String>())));
            }
            '$' => {
                i += 1;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_' || c[i] == '.') {
                    i += 1;
                }
                let s: String = c[start + 1..i].iter().collect();
                let mut parts = s.splitn(2, '.');
                let name = parts.next().unwrap_or("").to_string();
                toks.push(Tok::Var(name, fields(parts.next().unwrap_or(""))));
            }
            '"' => {
                i += 1;
                let mut s = String::new();
                loop {
                    let Some(&ch) = c.get(i) else {
                        return Err(err("unterminated string".into()));
                    };
                    i += 1;
                    match ch {
                        '"' => break,
                        '\\' => {
                            let e = c.get(i).copied().ok_or_else(|| err("bad escape".into()))?;
                            i += 1;
                            s.push(match e {
                                'n' => '\n',
                                't' => '\t',
                                'r' => '\r',
                                '0' => '\0',
                                other => other,
                            });
                        }
                        other => s.push(other),
                    }
                }
                toks.push(Tok::Str(s));
            }
            '`' => {
                i += 1;
                let s = i;
                while i < c.len() && c[i] != '`' {
                    i += 1;
                }
                if i >= c.len() {
                    return Err(err("unterminated raw string".into()));
                }
                toks.push(Tok::Str(c[s..i].iter().collect()));
                i += 1;
            }
            '\'' => {
                let ch = *c.get(i + 1).ok_or_else(|| err("bad char literal".into()))?;
                if c.get(i + 2) != Some(&'\'') {
                    return Err(err("bad char literal".into()));
                }
                toks.push(Tok::Num(Value::from(ch as u32)));
                i += 3;
            }
            _ if ch.is_ascii_digit()
                || ((ch == '-' || ch == '+')
                    && c.get(i + 1).is_some_and(|d| d.is_ascii_digit())) =>
            {
                i += 1;
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.' || c[i] == '_') {
                    i += 1;
                }
                let s: String = c[start..i].iter().collect();
                let v = parse_number(&s).ok_or_else(|| err(format!("bad number {s:?}")))?;
                toks.push(Tok::Num(v));
            }
            _ if ch.is_alphabetic() || ch == '_' => {
                while i < c.len() && ident_char(c[i]) && c[i] != '.' {
                    i += 1;
                }
                toks.push(Tok::Ident(c[start..i].iter().collect()));
            }
            other => return Err(err(format!("unexpected character {other:?}"))),
        }
    }
    Ok(toks)
}

fn parse_number(s: &str) -> Option<Value> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let body = body.replace('_', "");
    let int = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()
    } else if let Some(o) = body.strip_prefix("0o") {
        i64::from_str_radix(o, 8).ok()
    } else if let Some(b) = body.strip_prefix("0b") {
        i64::from_str_radix(b, 2).ok()
    } else if body.len() > 1 && body.starts_with('0') && body.bytes().all(|b| b.is_ascii_digit()) {
        i64::from_str_radix(&body[1..], 8).ok()
    } else {
        body.parse::<i64>().ok()
    };
    match int {
        Some(n) => Some(Value::from(if neg { -n } else { n })),
        None => s
            .parse::<f64>()
            .ok()
            .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number)),
    }
}

struct Parser {
    pieces: Vec<Piece>,
    idx: usize,
}

enum Stop {
    End,
    Else(Option<(usize, String)>),
    Eof,
}

impl Parser {
    fn list(&mut self) -> Result<(Vec<Node>, Stop, usize), Error> {
        let mut nodes = Vec::new();
        while self.idx < self.pieces.len() {
            let i = self.idx;
            self.idx += 1;
            match &self.pieces[i] {
                Piece::Text(t) => {
                    if !t.is_empty() {
                        nodes.push(Node::Text(t.clone()))
                    }
                }
                Piece::Action(pos, src) => {
                    let pos = *pos;
                    let src = src.trim().to_string();
                    let (kw, rest) = match src.split_once(char::is_whitespace) {
                        Some((k, r)) => (k.to_string(), r.trim().to_string()),
                        None => (src.clone(), String::new()),
                    };
                    match kw.as_str() {
                        "end" => return Ok((nodes, Stop::End, pos)),
                        "else" => {
                            let cond = if rest.is_empty() {
                                None
                            } else {
                                Some((pos, rest))
                            };
                            return Ok((nodes, Stop::Else(cond), pos));
                        }
                        "if" => nodes.push(self.parse_if(pos, &rest)?),
                        "range" => {
                            let (k, v, pipe) = parse_range_head(pos, &rest)?;
                            let (body, else_body) = self.body_with_else(pos, "range")?;
                            nodes.push(Node::Range(k, v, pipe, body, else_body));
                        }
                        "with" => {
                            let pipe = parse_pipeline(pos, &lex(&rest, pos)?)?;
                            let (body, else_body) = self.body_with_else(pos, "with")?;
                            nodes.push(Node::With(pipe, body, else_body));
                        }
                        "template" | "define" | "block" | "break" | "continue" => {
                            return Err(Error::Parse {
                                pos,
                                msg: format!("`{kw}` is not supported in Kairos templates"),
                            });
                        }
                        _ => nodes.push(Node::Action(parse_pipeline(pos, &lex(&src, pos)?)?)),
                    }
                }
            }
        }
        Ok((nodes, Stop::Eof, 0))
    }

    fn parse_if(&mut self, pos: usize, cond: &str) -> Result<Node, Error> {
        let mut branches = Vec::new();
        let mut cond = (pos, cond.to_string());
        loop {
            let pipe = parse_pipeline(cond.0, &lex(&cond.1, cond.0)?)?;
            let (body, stop, _) = self.list()?;
            branches.push((pipe, body));
            match stop {
                Stop::End => return Ok(Node::If(branches, Vec::new())),
                Stop::Else(Some((p, c))) => {
                    let c = c.strip_prefix("if").map(str::trim).ok_or(Error::Parse {
                        pos: p,
                        msg: "expected `else` or `else if`".into(),
                    })?;
                    cond = (p, c.to_string());
                }
                Stop::Else(None) => {
                    let (else_body, stop, _) = self.list()?;
                    if !matches!(stop, Stop::End) {
                        return Err(Error::Parse {
                            pos,
                            msg: "missing {{ end }} for if".into(),
                        });
                    }
                    return Ok(Node::If(branches, else_body));
                }
                Stop::Eof => {
                    return Err(Error::Parse {
                        pos,
                        msg: "missing {{ end }} for if".into(),
                    });
                }
            }
        }
    }

    fn body_with_else(&mut self, pos: usize, what: &str) -> Result<(Vec<Node>, Vec<Node>), Error> {
        let missing = || Error::Parse {
            pos,
            msg: format!("missing {{{{ end }}}} for {what}"),
        };
        let (body, stop, _) = self.list()?;
        match stop {
            Stop::End => Ok((body, Vec::new())),
            Stop::Else(None) => {
                let (e, stop, _) = self.list()?;
                match stop {
                    Stop::End => Ok((body, e)),
                    _ => Err(missing()),
                }
            }
            _ => Err(missing()),
        }
    }
}

fn parse_range_head(
    pos: usize,
    src: &str,
) -> Result<(Option<String>, Option<String>, Pipeline), Error> {
    let toks = lex(src, pos)?;
    if let Some(d) = toks.iter().position(|t| *t == Tok::Declare) {
        let vars: Vec<String> = toks[..d]
            .iter()
            .filter_map(|t| match t {
                Tok::Var(n, f) if f.is_empty() => Some(n.clone()),
                _ => None,
            })
            .collect();
        let pipe = parse_pipeline(pos, &toks[d + 1..])?;
        return Ok(match vars.as_slice() {
            [v] => (None, Some(v.clone()), pipe),
            [k, v] => (Some(k.clone()), Some(v.clone()), pipe),
            _ => {
                return Err(Error::Parse {
                    pos,
                    msg: "bad range variables".into(),
                });
            }
        });
    }
    Ok((None, None, parse_pipeline(pos, &toks)?))
}

fn parse_pipeline(pos: usize, toks: &[Tok]) -> Result<Pipeline, Error> {
    let err = |msg: &str| Error::Parse {
        pos,
        msg: msg.to_string(),
    };
    let mut decl = None;
    let mut toks = toks;
    if toks.len() >= 2
        && let (Tok::Var(n, f), Tok::Declare) = (&toks[0], &toks[1])
        && f.is_empty()
    {
        decl = Some(n.clone());
        toks = &toks[2..];
    }
    let mut cmds = Vec::new();
    let mut cur = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Pipe => {
                if cur.is_empty() {
                    return Err(err("empty command in pipeline"));
                }
                cmds.push(std::mem::take(&mut cur));
            }
            Tok::LParen => {
                let mut depth = 1;
                let mut j = i + 1;
                while j < toks.len() {
                    match toks[j] {
                        Tok::LParen => depth += 1,
                        Tok::RParen(_) => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                let Some(Tok::RParen(fs)) = toks.get(j) else {
                    return Err(err("unclosed parenthesis"));
                };
                let inner = parse_pipeline(pos, &toks[i + 1..j])?;
                cur.push(Operand::Sub(Box::new(inner), fs.clone()));
                i = j;
            }
            Tok::RParen(_) => return Err(err("unexpected )")),
            Tok::Declare | Tok::Comma => return Err(err("unexpected := or ,")),
            Tok::Dot(f) => cur.push(Operand::Field(f.clone())),
            Tok::Var(n, f) => cur.push(Operand::Var(n.clone(), f.clone())),
            Tok::Str(s) => cur.push(Operand::Lit(Value::String(s.clone()))),
            Tok::Num(n) => cur.push(Operand::Lit(n.clone())),
            Tok::Ident(id) => cur.push(match id.as_str() {
                "true" => Operand::Lit(Value::Bool(true)),
                "false" => Operand::Lit(Value::Bool(false)),
                "nil" => Operand::Lit(Value::Null),
                _ => {
                    if !funcs::exists(id) {
                        return Err(Error::Parse {
                            pos,
                            msg: format!("function {id:?} not defined"),
                        });
                    }
                    Operand::Func(id.clone())
                }
            }),
        }
        i += 1;
    }
    if cur.is_empty() {
        return Err(err("missing value for command"));
    }
    cmds.push(cur);
    Ok(Pipeline { decl, cmds })
}

/// Evaluation state: `.` and the variable stack.
struct Scope<'a> {
    root: &'a Value,
    vars: Vec<(String, Value)>,
    opts: Options,
}

impl Template {
    pub fn parse(src: &str) -> Result<Template, Error> {
        let mut p = Parser {
            pieces: split(src)?,
            idx: 0,
        };
        let (nodes, stop, pos) = p.list()?;
        match stop {
            Stop::Eof => Ok(Template { nodes }),
            Stop::End => Err(Error::Parse {
                pos,
                msg: "unexpected {{ end }}".into(),
            }),
            Stop::Else(_) => Err(Error::Parse {
                pos,
                msg: "unexpected {{ else }}".into(),
            }),
        }
    }

    pub fn render(&self, ctx: &Value, opts: Options) -> Result<String, Error> {
        let mut out = String::new();
        let mut scope = Scope {
            root: ctx,
            vars: vec![(String::new(), ctx.clone())],
            opts,
        };
        exec_list(&self.nodes, ctx, &mut scope, &mut out)?;
        Ok(out)
    }
}

fn exec_list(nodes: &[Node], dot: &Value, s: &mut Scope, out: &mut String) -> Result<(), Error> {
    for n in nodes {
        match n {
            Node::Text(t) => out.push_str(t),
            Node::Action(p) => {
                let v = eval_pipeline(p, dot, s)?;
                if p.decl.is_none() {
                    out.push_str(&funcs::to_text(&v));
                }
            }
            Node::If(branches, else_body) => {
                let mark = s.vars.len();
                let mut done = false;
                for (cond, body) in branches {
                    if funcs::truthy(&eval_pipeline(cond, dot, s)?) {
                        exec_list(body, dot, s, out)?;
                        done = true;
                        break;
                    }
                }
                if !done {
                    exec_list(else_body, dot, s, out)?;
                }
                s.vars.truncate(mark);
            }
            Node::With(p, body, else_body) => {
                let v = eval_pipeline(p, dot, s)?;
                let mark = s.vars.len();
                if funcs::truthy(&v) {
                    exec_list(body, &v, s, out)?;
                } else {
                    exec_list(else_body, dot, s, out)?;
                }
                s.vars.truncate(mark);
            }
            Node::Range(k, v, p, body, else_body) => {
                let val = eval_pipeline(p, dot, s)?;
                let items: Vec<(Value, Value)> = match &val {
                    Value::Array(a) => a
                        .iter()
                        .enumerate()
                        .map(|(i, x)| (Value::from(i), x.clone()))
                        .collect(),
                    Value::Object(m) => {
                        let mut keys: Vec<_> = m.keys().collect();
                        keys.sort();
                        keys.into_iter()
                            .map(|k| (Value::String(k.clone()), m[k].clone()))
                            .collect()
                    }
                    Value::Number(n) if n.as_u64().is_some() => (0..n.as_u64().unwrap_or(0))
                        .map(|i| (Value::from(i), Value::from(i)))
                        .collect(),
                    Value::Null => Vec::new(),
                    other => return Err(Error::Exec(format!("range can't iterate over {other}"))),
                };
                if items.is_empty() {
                    exec_list(else_body, dot, s, out)?;
                }
                for (key, item) in items {
                    let mark = s.vars.len();
                    match (k, v) {
                        (Some(k), Some(v)) => {
                            s.vars.push((k.clone(), key));
                            s.vars.push((v.clone(), item.clone()));
                        }
                        (None, Some(v)) => s.vars.push((v.clone(), item.clone())),
                        _ => {}
                    }
                    exec_list(body, &item, s, out)?;
                    s.vars.truncate(mark);
                }
            }
        }
    }
    Ok(())
}

fn eval_pipeline(p: &Pipeline, dot: &Value, s: &mut Scope) -> Result<Value, Error> {
    let mut prev: Option<Value> = None;
    for cmd in &p.cmds {
        prev = Some(eval_command(cmd, dot, s, prev)?);
    }
    let v = prev.unwrap_or(Value::Null);
    if let Some(name) = &p.decl {
        s.vars.push((name.clone(), v.clone()));
    }
    Ok(v)
}

fn eval_command(
    cmd: &[Operand],
    dot: &Value,
    s: &mut Scope,
    prev: Option<Value>,
) -> Result<Value, Error> {
    if let Operand::Func(name) = &cmd[0] {
        let mut args = Vec::new();
        for a in &cmd[1..] {
            args.push(eval_operand(a, dot, s)?);
        }
        if let Some(p) = prev {
            args.push(p);
        }
        return funcs::call(name, &args);
    }
    if cmd.len() > 1 || prev.is_some() {
        return Err(Error::Exec("can't give arguments to a non-function".into()));
    }
    eval_operand(&cmd[0], dot, s)
}

fn eval_operand(o: &Operand, dot: &Value, s: &mut Scope) -> Result<Value, Error> {
    match o {
        Operand::Lit(v) => Ok(v.clone()),
        Operand::Field(f) => lookup(dot, f, s.opts),
        Operand::Var(n, f) => {
            let base = if n.is_empty() {
                s.root.clone()
            } else {
                s.vars
                    .iter()
                    .rev()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| Error::Exec(format!("undefined variable ${n}")))?
            };
            lookup(&base, f, s.opts)
        }
        Operand::Func(name) => funcs::call(name, &[]),
        Operand::Sub(p, f) => {
            let v = eval_pipeline(p, dot, s)?;
            lookup(&v, f, s.opts)
        }
    }
}

fn lookup(base: &Value, path: &[String], opts: Options) -> Result<Value, Error> {
    let mut cur = base;
    for (i, k) in path.iter().enumerate() {
        match cur {
            Value::Object(m) => match m.get(k) {
                Some(v) => cur = v,
                None if opts.missing_key_error => {
                    return Err(Error::Exec(format!(
                        "map has no entry for key {:?}",
                        path[..=i].join(".")
                    )));
                }
                None => return Ok(Value::Null),
            },
            Value::Null if !opts.missing_key_error => return Ok(Value::Null),
            other => {
                return Err(Error::Exec(format!(
                    "can't evaluate field {k} in {}",
                    funcs::kind(other)
                )));
            }
        }
    }
    Ok(cur.clone())
}
