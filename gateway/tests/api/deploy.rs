//! The deployment files checked against what ECS requires and against the binary they
//! run: `deploy/ecs/task-definition.json` and the `Dockerfile`. Nothing here needs Docker
//! or AWS; the health check commands are run for real against a live server.

use std::process::Stdio;

use serde_json::Value;
use tiergate_config::Settings;

use crate::helpers::{Backends, TestApp, closed_port};
use crate::startup::tiergate;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn task_definition() -> Value {
    let path = format!("{ROOT}/deploy/ecs/task-definition.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

/// The one container that runs Tiergate.
fn container(task: &Value) -> &Value {
    let containers = task["containerDefinitions"].as_array().expect("containers");
    containers
        .iter()
        .find(|c| c["name"] == "tiergate")
        .expect("a container named tiergate")
}

/// Dockerfile instructions with continuation lines joined and comments dropped.
pub fn dockerfile_instructions() -> Vec<String> {
    let text = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

/// The JSON (exec-form) argument list of the last `keyword` instruction, after `skip`.
fn exec_form(instructions: &[String], keyword: &str, after: &str) -> Vec<String> {
    let line = instructions
        .iter()
        .rev()
        .find(|l| l.starts_with(keyword))
        .unwrap_or_else(|| panic!("no {keyword} in the Dockerfile"));
    let json = &line[line.find(after).expect("the marker") + after.len()..];
    serde_json::from_str(json.trim())
        .unwrap_or_else(|e| panic!("{keyword} is not exec form ({e}): {line}"))
}

#[test]
fn task_definition_has_what_fargate_requires() {
    let task = task_definition();
    assert!(task["family"].as_str().is_some_and(|f| !f.is_empty()));
    assert!(
        task["requiresCompatibilities"]
            .as_array()
            .is_some_and(|a| a.contains(&Value::from("FARGATE")))
    );
    assert_eq!(
        task["networkMode"], "awsvpc",
        "Fargate supports only awsvpc"
    );
    // Fargate accepts only some cpu/memory pairs (MiB).
    let cpu: u32 = task["cpu"].as_str().unwrap().parse().unwrap();
    let memory: u32 = task["memory"].as_str().unwrap().parse().unwrap();
    let allowed = match cpu {
        256 => [512, 1024, 2048].contains(&memory),
        512 => (1024..=4096).contains(&memory) && memory % 1024 == 0,
        1024 => (2048..=8192).contains(&memory) && memory % 1024 == 0,
        2048 => (4096..=16384).contains(&memory) && memory % 1024 == 0,
        4096 => (8192..=30720).contains(&memory) && memory % 1024 == 0,
        _ => false,
    };
    assert!(
        allowed,
        "cpu {cpu} with memory {memory} is not a Fargate size"
    );
    assert!(
        ["X86_64", "ARM64"].contains(&task["runtimePlatform"]["cpuArchitecture"].as_str().unwrap())
    );
    // Pulling secrets and shipping logs are done by the execution role.
    assert!(
        task["executionRoleArn"]
            .as_str()
            .is_some_and(|a| a.starts_with("arn:aws:iam::"))
    );

    let c = container(&task);
    assert!(c["image"].as_str().is_some_and(|i| !i.is_empty()));
    assert_eq!(c["essential"], true);
    let defaults = Settings::default();
    let port = c["portMappings"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(
        port,
        u64::from(defaults.listen.http.port()),
        "the image's listen.http port"
    );
    assert_eq!(
        c["portMappings"][0]["hostPort"], c["portMappings"][0]["containerPort"],
        "awsvpc needs hostPort = containerPort"
    );

    // Connection URLs are secrets, never plain environment.
    let secrets = c["secrets"].as_array().expect("secrets");
    for name in ["DATABASE_URL", "REDIS_URL"] {
        let secret = secrets
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{name} among the secrets"));
        let from = secret["valueFrom"].as_str().unwrap();
        assert!(
            from.starts_with("arn:aws:secretsmanager:") || from.starts_with("arn:aws:ssm:"),
            "{name} from Secrets Manager or SSM, got {from}"
        );
    }
    let environment = c["environment"].as_array().expect("environment");
    for var in environment {
        let name = var["name"].as_str().unwrap();
        assert!(
            !name.contains("URL") && !name.contains("PASSWORD"),
            "{name} belongs in secrets"
        );
    }
    let color = environment
        .iter()
        .find(|v| v["name"] == "DEPLOYMENT_COLOR")
        .expect("DEPLOYMENT_COLOR");
    let color = color["value"].as_str().unwrap();
    assert!(!color.is_empty() && color.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'));

    // ECS's limits on a container health check.
    let health = &c["healthCheck"];
    assert_eq!(
        health["command"][0], "CMD",
        "exec form: no shell in the image"
    );
    let within = |key: &str, min: u64, max: u64| {
        let v = health[key]
            .as_u64()
            .unwrap_or_else(|| panic!("healthCheck.{key}"));
        assert!((min..=max).contains(&v), "healthCheck.{key} = {v}");
    };
    within("interval", 5, 300);
    within("timeout", 2, 60);
    within("retries", 1, 10);
    within("startPeriod", 0, 300);
    assert!(
        health["timeout"].as_u64() < health["interval"].as_u64(),
        "a probe ends before the next starts"
    );

    // SIGKILL comes at stopTimeout: Tiergate's own deadline must be earlier.
    let stop = c["stopTimeout"].as_u64().unwrap();
    assert!(stop <= 120, "Fargate's stopTimeout maximum is 120 s");
    assert!(
        defaults.shutdown.timeout.as_secs() < stop,
        "shutdown.timeout ({:?}) under stopTimeout ({stop} s)",
        defaults.shutdown.timeout
    );
    assert_eq!(c["readonlyRootFilesystem"], true);
    let log = &c["logConfiguration"];
    assert_eq!(log["logDriver"], "awslogs");
    for option in ["awslogs-group", "awslogs-region", "awslogs-stream-prefix"] {
        assert!(
            log["options"][option]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
            "{option}"
        );
    }
}

#[tokio::test]
async fn health_check_commands_run_against_the_real_binary() {
    let task = task_definition();
    let command: Vec<String> =
        serde_json::from_value(container(&task)["healthCheck"]["command"].clone()).unwrap();
    let instructions = dockerfile_instructions();
    let entrypoint = exec_form(&instructions, "ENTRYPOINT", "ENTRYPOINT");
    let docker_health = exec_form(&instructions, "HEALTHCHECK", " CMD ");
    let cmd = exec_form(&instructions, "CMD", "CMD");
    assert_eq!(entrypoint.len(), 1);
    assert_eq!(
        command[1], entrypoint[0],
        "the task's health check runs the image's binary"
    );
    assert_eq!(
        command[1..],
        docker_health[..],
        "one health check, two places"
    );
    assert_eq!(cmd, ["serve"]);
    let port = &container(&task)["portMappings"][0]["containerPort"];
    assert!(
        instructions.contains(&format!("EXPOSE {port}")),
        "EXPOSE the task's container port {port}"
    );
    assert!(
        instructions.iter().any(|l| l == "STOPSIGNAL SIGTERM"),
        "STOPSIGNAL"
    );
    assert!(
        instructions.iter().any(|l| l.starts_with("USER ")
            && !l.starts_with("USER root")
            && !l.starts_with("USER 0")),
        "a non-root USER"
    );

    // The arguments after the binary's path, as the image runs them, parse and probe.
    let args = &command[2..];
    let run = |admin: String| {
        let mut cmd = tiergate(&[("TIERGATE_LISTEN__ADMIN", admin)]);
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
        async move { cmd.status().await.unwrap().code() }
    };
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    assert_eq!(run(app.admin.to_string()).await, Some(0));
    assert_eq!(run(format!("127.0.0.1:{}", closed_port())).await, Some(1));
    app.stop().await;
    let serve_help = tiergate(&[])
        .args(&cmd)
        .arg("--help")
        .status()
        .await
        .unwrap();
    assert!(serve_help.success(), "the image's CMD is a subcommand");
}
