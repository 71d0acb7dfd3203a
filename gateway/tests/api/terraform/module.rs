//! A Terraform module read the way Terraform would read it, as far as the deployment
//! tests need: every `.tf` file parsed with hcl-rs, `var.*` bound to the variables'
//! defaults, `local.*` evaluated in dependency order, and every reference to a resource
//! or data source attribute bound to a stand-in string (`aws_rds_cluster.this.endpoint`
//! becomes `"aws-rds-cluster-this-endpoint"`): what Terraform only learns at apply time.
//!
//! Only the functions the module's task definitions, secrets and collector config use
//! are defined; evaluating anything else fails with hcl-rs's message, naming the
//! function, rather than guessing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hcl::eval::{Context, Evaluate, FuncArgs, FuncDef, ParamType};
use hcl::expr::{Expression, ObjectKey, Operation, TemplateExpr, Traversal, TraversalOperator};
use hcl::template::{Directive, Element, Template};
use hcl::{Body, Map, Value};

/// Roots of references that are not resources: bound by the module itself or by
/// Terraform's expression scopes.
const NOT_RESOURCES: &[&str] = &["var", "local", "path", "each", "count", "self", "terraform"];

/// One Terraform module directory.
pub struct TerraformModule {
    dir: PathBuf,
    variables: BTreeMap<String, Value>,
    locals: BTreeMap<String, Expression>,
    resources: BTreeMap<(String, String), Body>,
    stand_ins: Map<String, Value>,
    /// The locals that evaluated; the others need something this reader lacks.
    local_values: Map<String, Value>,
}

impl TerraformModule {
    /// Reads every `.tf` file in `dir`. Variables without a default get a stand-in
    /// string (`"var-NAME"`).
    pub fn load(dir: &Path) -> Self {
        let mut bodies = Vec::new();
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "tf"))
            .collect();
        entries.sort();
        for path in entries {
            let text = std::fs::read_to_string(&path).unwrap();
            let body = hcl::parse(&text)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
            bodies.push(body);
        }

        let mut module = TerraformModule {
            dir: dir.to_owned(),
            variables: BTreeMap::new(),
            locals: BTreeMap::new(),
            resources: BTreeMap::new(),
            stand_ins: Map::new(),
            local_values: Map::new(),
        };
        let mut references = Vec::new();
        for body in &bodies {
            module.collect(body, &mut references);
        }
        module.stand_ins = stand_ins(&references);
        module.evaluate_locals();
        module
    }

    fn collect(&mut self, body: &Body, references: &mut Vec<Vec<Segment>>) {
        for block in body.blocks() {
            let labels: Vec<&str> = block.labels.iter().map(|l| l.as_str()).collect();
            match (block.identifier.as_str(), labels.as_slice()) {
                ("variable", [name]) => {
                    let default = block
                        .body
                        .attributes()
                        .find(|a| a.key.as_str() == "default")
                        .map(|a| a.expr.evaluate(&Context::new()).unwrap())
                        .unwrap_or_else(|| Value::String(format!("var-{name}")));
                    self.variables.insert((*name).to_owned(), default);
                }
                ("locals", []) => {
                    for attribute in block.body.attributes() {
                        walk(&attribute.expr, references);
                        self.locals
                            .insert(attribute.key.to_string(), attribute.expr.clone());
                    }
                }
                ("resource" | "data", [kind, name]) => {
                    walk_body(&block.body, references);
                    let kind = if block.identifier.as_str() == "data" {
                        format!("data.{kind}")
                    } else {
                        (*kind).to_owned()
                    };
                    self.resources
                        .insert((kind, (*name).to_owned()), block.body.clone());
                }
                _ => walk_body(&block.body, references),
            }
        }
    }

    /// Evaluates the locals, each once the locals it refers to are known.
    fn evaluate_locals(&mut self) {
        self.local_values = Map::new();
        loop {
            let mut progress = false;
            for (name, expr) in &self.locals {
                if self.local_values.contains_key(name) {
                    continue;
                }
                if let Ok(value) = expr.evaluate(&self.context()) {
                    self.local_values.insert(name.clone(), value);
                    progress = true;
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// The module's default of `name`.
    pub fn variable(&self, name: &str) -> Value {
        self.variables
            .get(name)
            .unwrap_or_else(|| panic!("no variable {name}"))
            .clone()
    }

    /// `local.NAME`, evaluated.
    pub fn local(&self, name: &str) -> Value {
        if let Some(value) = self.local_values.get(name) {
            return value.clone();
        }
        let expr = self
            .locals
            .get(name)
            .unwrap_or_else(|| panic!("no local {name}"));
        match expr.evaluate(&self.context()) {
            Ok(value) => value,
            Err(e) => panic!("local.{name} does not evaluate here: {e}"),
        }
    }

    /// An attribute of `resource "KIND" "NAME"` (or `data.KIND`), evaluated; `path` names
    /// nested blocks first (`["health_check", "path"]`).
    pub fn attribute(&self, kind: &str, name: &str, path: &[&str]) -> Value {
        let mut body = self
            .resources
            .get(&(kind.to_owned(), name.to_owned()))
            .unwrap_or_else(|| panic!("no resource {kind}.{name}"));
        let (attribute, blocks) = path.split_last().expect("an attribute name");
        for block in blocks {
            body = &body
                .blocks()
                .find(|b| b.identifier.as_str() == *block)
                .unwrap_or_else(|| panic!("{kind}.{name} has no {block} block"))
                .body;
        }
        let expr = &body
            .attributes()
            .find(|a| a.key.as_str() == *attribute)
            .unwrap_or_else(|| panic!("{kind}.{name} has no {}", path.join(".")))
            .expr;
        expr.evaluate(&self.context())
            .unwrap_or_else(|e| panic!("{kind}.{name}.{} does not evaluate: {e}", path.join(".")))
    }

    /// The names of the resources of `kind`.
    pub fn resources_of(&self, kind: &str) -> Vec<String> {
        self.resources
            .keys()
            .filter(|(k, _)| k == kind)
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// The stand-in string the evaluation binds `kind.name.attribute` to.
    pub fn stand_in(kind: &str, name: &str, attribute: &str) -> String {
        stand_in_name(&[kind, name, attribute])
    }

    fn context(&self) -> Context<'_> {
        let mut ctx = Context::new();
        for (root, value) in &self.stand_ins {
            ctx.declare_var(root.as_str(), value.clone());
        }
        let variables: Map<String, Value> = self
            .variables
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        ctx.declare_var("var", Value::Object(variables));
        ctx.declare_var("local", Value::Object(self.local_values.clone()));
        let mut path = Map::new();
        path.insert(
            "module".to_owned(),
            Value::String(self.dir.display().to_string()),
        );
        ctx.declare_var("path", Value::Object(path));
        declare_functions(&mut ctx);
        ctx
    }
}

/// One step of a reference: `.name` or `[index]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Segment {
    Attr(String),
    Index(u64),
}

fn walk_body(body: &Body, references: &mut Vec<Vec<Segment>>) {
    for attribute in body.attributes() {
        walk(&attribute.expr, references);
    }
    for block in body.blocks() {
        walk_body(&block.body, references);
    }
}

/// Collects every reference to something outside the module's own scopes.
fn walk(expr: &Expression, references: &mut Vec<Vec<Segment>>) {
    match expr {
        Expression::Array(items) => items.iter().for_each(|e| walk(e, references)),
        Expression::Object(object) => {
            for (key, value) in object {
                if let ObjectKey::Expression(key) = key {
                    walk(key, references);
                }
                walk(value, references);
            }
        }
        Expression::TemplateExpr(template) => walk_template_expr(template, references),
        Expression::Traversal(traversal) => walk_traversal(traversal, references),
        Expression::FuncCall(call) => call.args.iter().for_each(|e| walk(e, references)),
        Expression::Parenthesis(inner) => walk(inner, references),
        Expression::Conditional(c) => {
            walk(&c.cond_expr, references);
            walk(&c.true_expr, references);
            walk(&c.false_expr, references);
        }
        Expression::Operation(op) => match op.as_ref() {
            Operation::Unary(u) => walk(&u.expr, references),
            Operation::Binary(b) => {
                walk(&b.lhs_expr, references);
                walk(&b.rhs_expr, references);
            }
        },
        Expression::ForExpr(f) => {
            walk(&f.collection_expr, references);
            walk(&f.value_expr, references);
            f.key_expr.iter().for_each(|e| walk(e, references));
            f.cond_expr.iter().for_each(|e| walk(e, references));
        }
        _ => {}
    }
}

fn walk_template_expr(template: &TemplateExpr, references: &mut Vec<Vec<Segment>>) {
    if let Ok(template) = Template::from_expr(template) {
        walk_template(&template, references);
    }
}

fn walk_template(template: &Template, references: &mut Vec<Vec<Segment>>) {
    for element in template.elements() {
        match element {
            Element::Literal(_) => {}
            Element::Interpolation(i) => walk(&i.expr, references),
            Element::Directive(directive) => match directive.as_ref() {
                Directive::If(d) => {
                    walk(&d.cond_expr, references);
                    walk_template(&d.true_template, references);
                    if let Some(t) = &d.false_template {
                        walk_template(t, references);
                    }
                }
                Directive::For(d) => {
                    walk(&d.collection_expr, references);
                    walk_template(&d.template, references);
                }
            },
        }
    }
}

fn walk_traversal(traversal: &Traversal, references: &mut Vec<Vec<Segment>>) {
    walk(&traversal.expr, references);
    for operator in &traversal.operators {
        if let TraversalOperator::Index(index) = operator {
            walk(index, references);
        }
    }
    let Expression::Variable(root) = &traversal.expr else {
        return;
    };
    if NOT_RESOURCES.contains(&root.as_str()) {
        return;
    }
    let mut path = vec![Segment::Attr(root.to_string())];
    for operator in &traversal.operators {
        match operator {
            TraversalOperator::GetAttr(name) => path.push(Segment::Attr(name.to_string())),
            TraversalOperator::LegacyIndex(i) => path.push(Segment::Index(*i)),
            TraversalOperator::Index(Expression::Number(n)) => match n.as_u64() {
                Some(i) => path.push(Segment::Index(i)),
                None => break,
            },
            _ => break,
        }
    }
    references.push(path);
}

/// The stand-in objects: each reference's path leads to a string naming that path.
fn stand_ins(references: &[Vec<Segment>]) -> Map<String, Value> {
    let mut roots = Map::new();
    for path in references {
        let (Segment::Attr(root), rest) = path.split_first().expect("a root") else {
            continue;
        };
        let entry = roots.entry(root.clone()).or_insert(Value::Null);
        insert(entry, rest, &[root.as_str()]);
    }
    roots
}

fn insert(at: &mut Value, rest: &[Segment], so_far: &[&str]) {
    let Some((first, rest)) = rest.split_first() else {
        if at.is_null() {
            *at = Value::String(stand_in_name(so_far));
        }
        return;
    };
    match first {
        Segment::Attr(name) => {
            if !at.is_object() {
                *at = Value::Object(Map::new());
            }
            let Value::Object(map) = at else {
                unreachable!()
            };
            let next = map.entry(name.clone()).or_insert(Value::Null);
            insert(next, rest, &[so_far, &[name.as_str()]].concat());
        }
        Segment::Index(i) => {
            let i = usize::try_from(*i).expect("a small index");
            if !at.is_array() {
                *at = Value::Array(Vec::new());
            }
            let Value::Array(items) = at else {
                unreachable!()
            };
            while items.len() <= i {
                items.push(Value::Null);
            }
            let index = i.to_string();
            insert(&mut items[i], rest, &[so_far, &[index.as_str()]].concat());
        }
    }
}

fn stand_in_name(path: &[&str]) -> String {
    path.join("-").replace(['_', '.'], "-")
}

// ---- functions --------------------------------------------------------------------------

fn declare_functions(ctx: &mut Context<'_>) {
    let any = || ParamType::Any;
    let string = || ParamType::String;
    ctx.declare_func(
        "jsonencode",
        FuncDef::builder().param(any()).build(jsonencode),
    );
    // JSON is YAML too: enough for tests that read the document's words, not its layout.
    ctx.declare_func(
        "yamlencode",
        FuncDef::builder().param(any()).build(jsonencode),
    );
    ctx.declare_func("tostring", FuncDef::builder().param(any()).build(tostring));
    ctx.declare_func("length", FuncDef::builder().param(any()).build(length));
    ctx.declare_func(
        "merge",
        FuncDef::builder()
            .variadic_param(ParamType::object_of(any()))
            .build(merge),
    );
    ctx.declare_func(
        "startswith",
        FuncDef::builder()
            .params([string(), string()])
            .build(startswith),
    );
    ctx.declare_func(
        "split",
        FuncDef::builder().params([string(), string()]).build(split),
    );
    ctx.declare_func(
        "element",
        FuncDef::builder()
            .params([ParamType::array_of(any()), ParamType::Number])
            .build(element),
    );
    ctx.declare_func(
        "templatefile",
        FuncDef::builder()
            .params([string(), ParamType::object_of(any())])
            .build(templatefile),
    );
}

fn jsonencode(args: FuncArgs) -> Result<Value, String> {
    serde_json::to_string(&args[0])
        .map(Value::String)
        .map_err(|e| e.to_string())
}

fn tostring(args: FuncArgs) -> Result<Value, String> {
    match &args[0] {
        Value::String(s) => Ok(Value::String(s.clone())),
        Value::Number(n) => Ok(Value::String(n.to_string())),
        Value::Bool(b) => Ok(Value::String(b.to_string())),
        other => Err(format!("tostring of {other:?}")),
    }
}

fn length(args: FuncArgs) -> Result<Value, String> {
    let n = match &args[0] {
        Value::Array(a) => a.len(),
        Value::Object(o) => o.len(),
        Value::String(s) => s.chars().count(),
        other => return Err(format!("length of {other:?}")),
    };
    Ok(Value::from(n))
}

fn merge(args: FuncArgs) -> Result<Value, String> {
    let mut merged = Map::new();
    for arg in args.iter() {
        if let Value::Object(map) = arg {
            merged.extend(map.clone());
        }
    }
    Ok(Value::Object(merged))
}

fn startswith(args: FuncArgs) -> Result<Value, String> {
    let (Value::String(s), Value::String(prefix)) = (&args[0], &args[1]) else {
        return Err("startswith takes two strings".to_owned());
    };
    Ok(Value::Bool(s.starts_with(prefix.as_str())))
}

fn split(args: FuncArgs) -> Result<Value, String> {
    let (Value::String(separator), Value::String(s)) = (&args[0], &args[1]) else {
        return Err("split takes two strings".to_owned());
    };
    Ok(Value::Array(
        s.split(separator.as_str()).map(Value::from).collect(),
    ))
}

fn element(args: FuncArgs) -> Result<Value, String> {
    let (Value::Array(items), Value::Number(n)) = (&args[0], &args[1]) else {
        return Err("element takes a list and a number".to_owned());
    };
    let i = n.as_u64().ok_or("element: a whole index")?;
    let i = usize::try_from(i).map_err(|e| e.to_string())?;
    items
        .get(i % items.len().max(1))
        .cloned()
        .ok_or_else(|| "element of an empty list".to_owned())
}

/// Terraform's `templatefile`: the file's text as a template, with only `vars` in scope.
fn templatefile(args: FuncArgs) -> Result<Value, String> {
    let (Value::String(path), Value::Object(vars)) = (&args[0], &args[1]) else {
        return Err("templatefile takes a path and an object".to_owned());
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let template: Template = text.parse().map_err(|e| format!("{path}: {e}"))?;
    let mut ctx = Context::new();
    for (name, value) in vars {
        ctx.declare_var(name.as_str(), value.clone());
    }
    template
        .evaluate(&ctx)
        .map(Value::String)
        .map_err(|e| format!("{path}: {e}"))
}
