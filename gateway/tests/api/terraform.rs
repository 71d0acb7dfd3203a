//! `deploy/terraform` checked against the binary it deploys: the contract between the
//! infrastructure and Tiergate's settings, read from the `.tf` and `.json` files rather
//! than restated here.
//!
//! - every variable the task definitions set is one Tiergate reads, and together they
//!   pass `tiergate config check` (with the secret values the module assembles);
//! - the ALB, target group and ECS numbers pair with Tiergate's effective settings;
//! - the probes, commands and metrics the module names exist in the binary;
//! - `deploy/ecs/task-definition.json` is the module's service task definition.
//!
//! No Terraform binary is needed (none can be installed here): [`module`] evaluates the
//! module with the variables' defaults and stand-ins for what only an apply would know.

mod module;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use tiergate_config::Settings;

use crate::deploy::dockerfile_instructions;
use crate::helpers::{Backends, TestApp};
use crate::startup::tiergate;
use module::TerraformModule;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// Variables the binary reads outside its settings, so `config check` cannot judge them.
/// `RUST_LOG` is the log filter (tracing-subscriber's `EnvFilter`).
const READ_OUTSIDE_SETTINGS: &[&str] = &["RUST_LOG"];

fn tiergate_module() -> TerraformModule {
    TerraformModule::load(Path::new(&format!(
        "{ROOT}/deploy/terraform/modules/tiergate"
    )))
}

fn json(value: hcl::Value) -> Value {
    serde_json::to_value(value).expect("HCL values are JSON values")
}

fn json_task_definition() -> Value {
    let path = format!("{ROOT}/deploy/ecs/task-definition.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn json_container<'a>(task: &'a Value, name: &str) -> &'a Value {
    task["containerDefinitions"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The settings file the image runs with: the Dockerfile's `TIERGATE_CONFIG`, traced
/// back through its `COPY` to the file in this repository.
fn image_settings_file() -> PathBuf {
    let instructions = dockerfile_instructions();
    let in_image = instructions
        .iter()
        .filter_map(|l| l.strip_prefix("ENV "))
        .flat_map(str::split_whitespace)
        .find_map(|pair| pair.strip_prefix("TIERGATE_CONFIG="))
        .expect("ENV TIERGATE_CONFIG in the Dockerfile")
        .to_owned();
    let source = instructions
        .iter()
        .filter_map(|l| l.strip_prefix("COPY "))
        .find_map(|args| {
            let words: Vec<&str> = args.split_whitespace().collect();
            (words.last() == Some(&in_image.as_str())).then(|| words[words.len() - 2].to_owned())
        })
        .unwrap_or_else(|| panic!("no COPY to {in_image} in the Dockerfile"));
    PathBuf::from(format!("{ROOT}/{source}"))
}

/// The value a container's secret resolves to: the module's secret, or one key of its
/// JSON (`ARN:key::`), as the module assembles it.
fn secret_value(module: &TerraformModule, value_from: &str) -> String {
    for secret in module.resources_of("aws_secretsmanager_secret") {
        let arn = TerraformModule::stand_in("aws_secretsmanager_secret", &secret, "arn");
        let Some(rest) = value_from.strip_prefix(&arn) else {
            continue;
        };
        let id = TerraformModule::stand_in("aws_secretsmanager_secret", &secret, "id");
        let version = module
            .resources_of("aws_secretsmanager_secret_version")
            .into_iter()
            .find(|v| {
                module.attribute("aws_secretsmanager_secret_version", v, &["secret_id"])
                    == hcl::Value::String(id.clone())
            })
            .unwrap_or_else(|| panic!("no version of secret {secret}"));
        let string = module.attribute(
            "aws_secretsmanager_secret_version",
            &version,
            &["secret_string"],
        );
        let string = string
            .as_str()
            .expect("secret_string is a string")
            .to_owned();
        if rest.is_empty() {
            return string;
        }
        let key = rest
            .strip_prefix(':')
            .and_then(|r| r.strip_suffix("::"))
            .unwrap_or_else(|| panic!("{value_from}: expected ARN:key::"));
        let fields: Value = serde_json::from_str(&string).expect("a JSON secret");
        return match &fields[key] {
            Value::String(s) => s.clone(),
            Value::Null => panic!("secret {secret} has no key {key}"),
            other => other.to_string(),
        };
    }
    panic!("{value_from} names none of the module's secrets")
}

/// A container's environment as it starts: `environment`, then every secret's value.
fn container_env(module: &TerraformModule, container: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in container["environment"].as_array().into_iter().flatten() {
        env.insert(
            var["name"].as_str().unwrap().to_owned(),
            var["value"]
                .as_str()
                .expect("environment values are strings")
                .to_owned(),
        );
    }
    for secret in container["secrets"].as_array().into_iter().flatten() {
        let from = secret["valueFrom"].as_str().unwrap();
        env.insert(
            secret["name"].as_str().unwrap().to_owned(),
            secret_value(module, from),
        );
    }
    env
}

/// Runs `tiergate config ACTION` with the image's settings file and `env`.
async fn config(action: &str, env: &BTreeMap<String, String>) -> Output {
    let mut vars: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    vars.push((
        "TIERGATE_CONFIG",
        image_settings_file().display().to_string(),
    ));
    tiergate(&vars)
        .args(["config", action])
        .output()
        .await
        .unwrap()
}

/// The settings a task gets: the same loader as the binary, in process, for typed values.
fn effective_settings(env: &BTreeMap<String, String>) -> Settings {
    let source: HashMap<String, String> = env.clone().into_iter().collect();
    tiergate_config::load(Some(&image_settings_file()), &source)
        .unwrap_or_else(|e| panic!("the task's settings do not load: {e}"))
}

/// Whether `name` changes what `config print` shows: removed, or failing that, given a
/// different value (a port one higher, any other value with a suffix). A variable
/// Tiergate does not read changes nothing either way.
async fn changes_settings(env: &BTreeMap<String, String>, name: &str) -> bool {
    let with = config("print", env).await;
    assert!(with.status.success(), "config print fails");
    let mut without = env.clone();
    let value = without.remove(name).unwrap();
    if config("print", &without).await.stdout != with.stdout {
        return true;
    }
    let mut altered = env.clone();
    let other = match value.parse::<u16>() {
        Ok(n) => (n.wrapping_add(1)).to_string(),
        Err(_) => format!("{value}x"),
    };
    altered.insert(name.to_owned(), other);
    let out = config("print", &altered).await;
    out.status.success() && out.stdout != with.stdout
}

/// The module's containers (service and migration) as ECS receives them.
fn module_containers(module: &TerraformModule) -> Vec<Value> {
    [
        "tiergate_container",
        "collector_container",
        "migrate_container",
    ]
    .into_iter()
    .map(|name| json(module.local(name)))
    .collect()
}

/// Every variable the Tiergate containers of the module set (service and migration,
/// secrets with the values the module assembles) passes `tiergate config check`, and every
/// one that isn't `TIERGATE_*` changes the settings: a misspelt conventional variable
/// (`DATABSE_URL`) is ignored by the loader, so "accepted" alone would let it through.
///
/// Mutations that fail it: `sslmode=verify-ful` in `local.database_secret`; dropping
/// `TIERGATE_DATABASE__CA_FILE` (verify-full then has no CA); `TIERGATE_SHUTDOWN__TIMEOUT`
/// spelt `TIERGATE_SHUTDOWN__TIMOUT`; `PORT` spelt `PORTS`.
#[tokio::test]
async fn every_variable_the_task_definitions_set_is_one_tiergate_reads() {
    let module = tiergate_module();
    for container in module_containers(&module) {
        if container["name"] == "otel-collector" {
            continue;
        }
        let env = container_env(&module, &container);
        let name = &container["name"];
        let check = config("check", &env).await;
        assert!(
            check.status.success(),
            "{name}: tiergate config check refuses the task's environment:\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
        for var in env.keys() {
            if var.starts_with("TIERGATE_") || READ_OUTSIDE_SETTINGS.contains(&var.as_str()) {
                continue;
            }
            assert!(
                changes_settings(&env, var).await,
                "{name}: {var} changes no setting: Tiergate does not read it (a typo?)"
            );
        }
    }
}

/// The numbers on the AWS side pair with the settings each task really gets (the image's
/// file plus the task's environment), for the module's task definition and the JSON one:
/// stopTimeout > shutdown.timeout, deregistration delay >= shutdown.drain_delay, ALB idle
/// timeout < http.idle_timeout, and one port for listen.http, the container, the target
/// group and the service's load balancer.
///
/// Mutations that fail it: `deregistration_delay` default 4; `alb_idle_timeout` default
/// 80; `stopTimeout` 25 in the JSON; `TIERGATE_SHUTDOWN__TIMEOUT` 30s in the JSON.
#[test]
fn the_timing_and_port_pairings_hold() {
    let module = tiergate_module();
    let json_task = json_task_definition();
    let module_tiergate = json(module.local("tiergate_container"));
    let deregistration = module
        .attribute("aws_lb_target_group", "this", &["deregistration_delay"])
        .as_u64()
        .expect("deregistration_delay");
    let alb_idle = module
        .attribute("aws_lb", "this", &["idle_timeout"])
        .as_u64()
        .expect("idle_timeout");
    let group_port = module.attribute("aws_lb_target_group", "this", &["port"]);
    let service_port = module.attribute(
        "aws_ecs_service",
        "this",
        &["load_balancer", "container_port"],
    );
    let service_container = module.attribute(
        "aws_ecs_service",
        "this",
        &["load_balancer", "container_name"],
    );
    assert_eq!(
        module.attribute("aws_lb_target_group", "this", &["health_check", "port"]),
        hcl::Value::from("traffic-port")
    );

    for (which, container) in [
        ("module", &module_tiergate),
        ("deploy/ecs", json_container(&json_task, "tiergate")),
    ] {
        // The JSON's secrets are ARNs of an example account: take the module's values
        // for the same names (the agreement test proves the names are the same).
        let mut env = container_env(&module, &module_tiergate);
        for var in container["environment"].as_array().unwrap() {
            env.insert(
                var["name"].as_str().unwrap().to_owned(),
                var["value"].as_str().unwrap().to_owned(),
            );
        }
        let settings = effective_settings(&env);
        let stop = container["stopTimeout"].as_u64().expect("stopTimeout");
        assert!(
            settings.shutdown.timeout.as_secs() < stop,
            "{which}: shutdown.timeout {:?} must end before stopTimeout {stop} s (SIGKILL)",
            settings.shutdown.timeout
        );
        assert!(
            deregistration >= settings.shutdown.drain_delay.as_secs(),
            "{which}: deregistration delay {deregistration} s shorter than shutdown.drain_delay {:?}",
            settings.shutdown.drain_delay
        );
        assert!(
            alb_idle < settings.http.idle_timeout.as_secs(),
            "{which}: ALB idle timeout {alb_idle} s not below http.idle_timeout {:?}",
            settings.http.idle_timeout
        );
        let container_port = &container["portMappings"][0]["containerPort"];
        assert_eq!(
            container_port.as_u64(),
            Some(u64::from(settings.listen.http.port())),
            "{which}: container port and listen.http"
        );
        assert_eq!(
            json(group_port.clone()),
            *container_port,
            "{which}: target group port"
        );
        assert_eq!(
            json(service_port.clone()),
            *container_port,
            "{which}: service port"
        );
        assert_eq!(json(service_container.clone()), container["name"]);
    }
}

/// What the module points at exists in the binary: the ALB's health-check path answers 200
/// on the public listener of a ready server; the migration task's command migrates a
/// fresh database; the collector scrapes the admin listener's address; and every metric
/// an alarm or alert rule names is on `/metrics` (a counter loses `_total` on its way to
/// CloudWatch).
///
/// Mutations that fail it: `health_check_path` default `/ready`; the migrate command
/// `migrations`; the collector template's target port `9091`; an alarm on
/// `tiergate_http_shedded`.
#[tokio::test]
async fn the_probes_commands_and_metrics_the_module_names_exist() {
    let module = tiergate_module();
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;

    let path = module.attribute("aws_lb_target_group", "this", &["health_check", "path"]);
    let path = path.as_str().expect("a health check path");
    let matcher = module.attribute("aws_lb_target_group", "this", &["health_check", "matcher"]);
    let status = app.get(path).await.status();
    assert_eq!(
        json(matcher).as_str(),
        Some(status.as_str()),
        "ALB health check {path}"
    );

    let exported: Vec<String> = app
        .metrics()
        .await
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let namespace = module.local("metrics_namespace");
    for alarm in module.resources_of("aws_cloudwatch_metric_alarm") {
        if module.attribute("aws_cloudwatch_metric_alarm", &alarm, &["namespace"]) != namespace {
            continue;
        }
        let metric = module.attribute("aws_cloudwatch_metric_alarm", &alarm, &["metric_name"]);
        let metric = metric.as_str().unwrap();
        assert!(
            exported
                .iter()
                .any(|e| e == metric || *e == format!("{metric}_total")),
            "alarm {alarm} watches {metric}, which Tiergate does not export"
        );
    }
    let rules = module.attribute("aws_prometheus_rule_group_namespace", "tiergate", &["data"]);
    let rules = rules.as_str().unwrap_or_default().to_owned();
    for metric in rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("tiergate_"))
    {
        assert!(
            exported.iter().any(|e| e == metric),
            "an AMP alert rule uses {metric}, which Tiergate does not export"
        );
    }
    app.stop().await;

    let collector = module.local("collector_config");
    let collector = collector.as_str().unwrap();
    let service = json(module.local("tiergate_container"));
    let settings = effective_settings(&container_env(&module, &service));
    let scraped = format!("127.0.0.1:{}", settings.listen.admin.port());
    assert!(
        collector.contains(&format!("targets: [\"{scraped}\"]")),
        "the collector scrapes {scraped}, where the admin listener is:\n{collector}"
    );
    assert!(
        settings.listen.admin.ip().is_loopback() || settings.listen.admin.ip().is_unspecified(),
        "the collector reaches the admin listener on loopback"
    );

    let migrate = json(module.local("migrate_container"));
    let command: Vec<String> = serde_json::from_value(migrate["command"].clone()).unwrap();
    let fresh = Backends::new().await;
    let out = tiergate(&[(
        "DATABASE_URL",
        fresh.settings().database.url.expose().to_owned(),
    )])
    .args(&command)
    .output()
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the migration task's command {command:?} fails:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = fresh.db.client().await;
    let tables = db
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'tiergate_schema_migrations'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(tables, 1, "migrate created the schema");
}

/// The values that differ between one deployment and another, blanked out: the image
/// tag, the secrets' ARNs (their JSON key stays), the log group and region.
fn deployment_neutral(mut container: Value) -> Value {
    if container["name"] == "tiergate" || container["name"] == "migrate" {
        container["image"] = Value::from("IMAGE");
    }
    if let Some(secrets) = container["secrets"].as_array_mut() {
        for secret in secrets.iter_mut() {
            let from = secret["valueFrom"].as_str().unwrap();
            let key = from.strip_suffix("::").and_then(|f| f.rsplit_once(':'));
            secret["valueFrom"] = Value::from(match key {
                Some((_, key)) => format!("ARN:{key}::"),
                None => "ARN".to_owned(),
            });
        }
        secrets.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    }
    if let Some(environment) = container["environment"].as_array_mut() {
        environment.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    }
    let options = &mut container["logConfiguration"]["options"];
    for option in ["awslogs-group", "awslogs-region"] {
        if !options[option].is_null() {
            options[option] = Value::from("DEPLOYMENT");
        }
    }
    container
}

/// `deploy/ecs/task-definition.json` is the module's service task definition with an
/// example account's ARNs: the same containers with the same settings, environment,
/// secrets (by name and JSON key), health checks and limits, and the same task size.
///
/// Mutations that fail it: `RUST_LOG` "debug" in the JSON; the collector's `essential`
/// true in the module; a variable added to `tiergate_environment` only.
#[test]
fn the_json_task_definition_is_the_modules() {
    let module = tiergate_module();
    let task = json_task_definition();
    let from_module: Vec<Value> = ["tiergate_container", "collector_container"]
        .into_iter()
        .map(|name| deployment_neutral(json(module.local(name))))
        .collect();
    let from_json: Vec<Value> = task["containerDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .cloned()
        .map(deployment_neutral)
        .collect();
    for (m, j) in from_module.iter().zip(&from_json) {
        assert_eq!(
            m,
            j,
            "container {} differs:\nmodule: {}\njson:   {}",
            m["name"],
            serde_json::to_string_pretty(m).unwrap(),
            serde_json::to_string_pretty(j).unwrap()
        );
    }
    assert_eq!(from_module.len(), from_json.len(), "the same containers");

    let attribute =
        |name: &str| json(module.attribute("aws_ecs_task_definition", "tiergate", &[name]));
    assert_eq!(task["family"], json(module.variable("name")));
    assert_eq!(task["cpu"], attribute("cpu"));
    assert_eq!(task["memory"], attribute("memory"));
    assert_eq!(task["networkMode"], attribute("network_mode"));
    assert_eq!(
        task["requiresCompatibilities"],
        attribute("requires_compatibilities")
    );
    assert_eq!(
        task["runtimePlatform"]["cpuArchitecture"],
        json(module.attribute(
            "aws_ecs_task_definition",
            "tiergate",
            &["runtime_platform", "cpu_architecture"]
        ))
    );
}
