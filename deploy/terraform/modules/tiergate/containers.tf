# The containers of the two task definitions. deploy/ecs/task-definition.json is the same
# service task definition written out for teams without Terraform;
# gateway/tests/api/terraform.rs evaluates these locals and proves the two agree, and
# runs `tiergate config check` on the environment below with the secret values the
# secrets.tf locals assemble.

locals {
  # In the image (Dockerfile): the RDS global CA bundle, for sslmode=verify-full.
  rds_ca_file = "/etc/ssl/rds/global-bundle.pem"

  # The admin listener stays on loopback (the health check and the collector reach it
  # there: containers of a task share one network namespace) unless someone inside the
  # VPC is given access to it.
  admin_exposed = length(var.admin_ingress_cidrs) + length(var.admin_ingress_security_group_ids) > 0
  admin_address = "${local.admin_exposed ? "0.0.0.0" : "127.0.0.1"}:${var.admin_port}"

  image = "${aws_ecr_repository.this.repository_url}${startswith(var.image_tag, "sha256:") ? "@" : ":"}${var.image_tag}"

  # Tiergate's settings that pair with the ALB and ECS numbers, set here so that both
  # sides of each pairing come from this module's variables.
  tiergate_environment = merge({
    DEPLOYMENT_COLOR                    = var.deployment_color
    RUST_LOG                            = var.log_level
    PORT                                = tostring(var.container_port)
    TIERGATE_LISTEN__ADMIN              = local.admin_address
    TIERGATE_HTTP__IDLE_TIMEOUT         = "${var.keepalive_idle_timeout}s"
    TIERGATE_SHUTDOWN__DRAIN_DELAY      = "${var.drain_delay}s"
    TIERGATE_SHUTDOWN__TIMEOUT          = "${var.shutdown_timeout}s"
    TIERGATE_DATABASE__CA_FILE          = local.rds_ca_file
    TIERGATE_DATABASE__MIGRATE_ON_START = "false"
  }, var.extra_environment)

  # Secrets Manager references; "ARN:key::" picks one key of a JSON secret.
  tiergate_secrets = {
    DATABASE_URL          = "${aws_secretsmanager_secret.database.arn}:url::"
    DATABASE_READER_URL   = "${aws_secretsmanager_secret.database.arn}:reader_url::"
    REDIS_URL             = "${aws_secretsmanager_secret.redis.arn}:url::"
    TIERGATE_ADMIN__TOKEN = aws_secretsmanager_secret.admin_token.arn
  }

  tiergate_container = {
    name                   = "tiergate"
    image                  = local.image
    essential              = true
    user                   = "65532:65532"
    readonlyRootFilesystem = true
    portMappings = [{
      name          = "http"
      containerPort = var.container_port
      hostPort      = var.container_port
      protocol      = "tcp"
      appProtocol   = "http"
    }]
    environment = [for name, value in local.tiergate_environment : { name = name, value = value }]
    secrets     = [for name, from in local.tiergate_secrets : { name = name, valueFrom = from }]
    # Liveness only: a database outage must not get every task replaced.
    healthCheck = {
      command     = ["CMD", "/usr/local/bin/tiergate", "healthcheck", "--timeout", "2s"]
      interval    = 10
      timeout     = 3
      retries     = 3
      startPeriod = 10
    }
    stopTimeout     = var.stop_timeout
    linuxParameters = { initProcessEnabled = false }
    ulimits         = [{ name = "nofile", softLimit = 65536, hardLimit = 65536 }]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.tasks.name
        awslogs-region        = local.region
        awslogs-stream-prefix = "tiergate"
        mode                  = "non-blocking"
        max-buffer-size       = "4m"
      }
    }
  }

  # Scrapes the admin listener's /metrics over loopback (shared network namespace) and
  # ships the metrics to CloudWatch (EMF) or Amazon Managed Prometheus. Not essential: a
  # collector failure must not take the service down with it.
  collector_container = {
    name                   = "otel-collector"
    image                  = var.collector_image
    essential              = false
    readonlyRootFilesystem = true
    secrets                = [{ name = "AOT_CONFIG_CONTENT", valueFrom = aws_ssm_parameter.collector_config.arn }]
    dependsOn              = [{ containerName = "tiergate", condition = "START" }]
    healthCheck = {
      command     = ["/healthcheck"]
      interval    = 30
      timeout     = 5
      retries     = 3
      startPeriod = 10
    }
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.tasks.name
        awslogs-region        = local.region
        awslogs-stream-prefix = "otel-collector"
        mode                  = "non-blocking"
        max-buffer-size       = "1m"
      }
    }
  }

  # The one-off `tiergate migrate` task: the image and database settings of the service,
  # nothing else (no port, no Redis, no admin token).
  migrate_environment = {
    RUST_LOG                   = var.log_level
    TIERGATE_DATABASE__CA_FILE = local.rds_ca_file
  }

  migrate_container = {
    name                   = "migrate"
    image                  = local.image
    essential              = true
    user                   = "65532:65532"
    readonlyRootFilesystem = true
    command                = ["migrate", "--timeout", "120s"]
    environment            = [for name, value in local.migrate_environment : { name = name, value = value }]
    secrets                = [{ name = "DATABASE_URL", valueFrom = "${aws_secretsmanager_secret.database.arn}:url::" }]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.tasks.name
        awslogs-region        = local.region
        awslogs-stream-prefix = "migrate"
      }
    }
  }
}
