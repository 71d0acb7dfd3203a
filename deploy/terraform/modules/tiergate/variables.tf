# Inputs. Defaults are what a small production deployment wants; docs/deploy-aws.md
# lists them with their cost. The timing variables come in pairs that must agree with
# Tiergate's own settings: each pairing is checked here (validation) and, against the
# real binary, by gateway/tests/api/terraform.rs.

# ---- naming -----------------------------------------------------------------------------

variable "name" {
  description = "Prefix of every resource name, and the ECS family and service name."
  type        = string
  default     = "tiergate"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name must be 2 to 21 characters of a-z, 0-9 and -, starting with a letter (it ends up in target group names, limited to 32 characters)."
  }
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

# ---- network ----------------------------------------------------------------------------

variable "vpc_cidr" {
  description = "CIDR of the VPC. Split into /20s: public, private (tasks) and isolated (data) subnets per AZ."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && tonumber(split("/", var.vpc_cidr)[1]) <= 18
    error_message = "vpc_cidr must be a valid IPv4 CIDR of /18 or larger (nine /20 subnets must fit)."
  }
}

variable "az_count" {
  description = "Availability zones to spread over (2 or 3). Aurora, ElastiCache and the ALB need at least two."
  type        = number
  default     = 2

  validation {
    condition     = var.az_count >= 2 && var.az_count <= 3
    error_message = "az_count must be 2 or 3."
  }
}

variable "nat_gateway_per_az" {
  description = "One NAT gateway per AZ (an AZ outage leaves the others' egress intact) instead of one shared one (cheaper)."
  type        = bool
  default     = false
}

variable "vpc_endpoints" {
  description = "Interface endpoints for ECR, CloudWatch Logs, Secrets Manager, SSM and the S3 gateway endpoint, so image pulls, logs and secrets stay off the NAT gateway."
  type        = bool
  default     = false
}

variable "flow_log_retention_days" {
  description = "Retention of the VPC flow logs in CloudWatch Logs."
  type        = number
  default     = 90
}

# ---- edge -------------------------------------------------------------------------------

variable "certificate_arn" {
  description = "ACM certificate ARN for the HTTPS listener (same region as the ALB)."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:acm:", var.certificate_arn))
    error_message = "certificate_arn must be an ACM certificate ARN."
  }
}

variable "ssl_policy" {
  description = "TLS policy of the HTTPS listener. The default offers TLS 1.3 and 1.2 with forward-secret ciphers only."
  type        = string
  default     = "ELBSecurityPolicy-TLS13-1-2-2021-06"
}

variable "ingress_cidrs" {
  description = "Client CIDRs allowed to reach the ALB on 80 and 443."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "waf_web_acl_arn" {
  description = "WAFv2 web ACL (scope REGIONAL) to associate with the ALB; null for none."
  type        = string
  default     = null
}

variable "alb_access_logs_bucket" {
  description = "S3 bucket for ALB access logs (its policy must allow the regional ELB account); null for none."
  type        = string
  default     = null
}

variable "alb_deletion_protection" {
  description = "Refuse to delete the ALB (turn off before a teardown)."
  type        = bool
  default     = true
}

variable "alb_idle_timeout" {
  description = "Seconds the ALB keeps an idle connection (client and target side). Must stay below Tiergate's http.idle_timeout (keepalive_idle_timeout), or the ALB reuses a connection Tiergate just closed and answers 502."
  type        = number
  default     = 60

  validation {
    condition     = var.alb_idle_timeout >= 1 && var.alb_idle_timeout < var.keepalive_idle_timeout
    error_message = "alb_idle_timeout must be at least 1 and below keepalive_idle_timeout (Tiergate's http.idle_timeout)."
  }
}

variable "deregistration_delay" {
  description = "Seconds the target group keeps a deregistering task's connections before ECS sends SIGTERM. Must cover drain_delay: requests the ALB routed just before it saw the deregistration still arrive."
  type        = number
  default     = 30

  validation {
    condition     = var.deregistration_delay >= var.drain_delay && var.deregistration_delay <= 3600
    error_message = "deregistration_delay must be at least drain_delay (Tiergate's shutdown.drain_delay) and at most 3600."
  }
}

variable "health_check_path" {
  description = "Path the ALB probes on the container port: /readyz turns 503 while starting and at once on SIGTERM, and does not probe the database on every call."
  type        = string
  default     = "/readyz"
}

variable "health_check_interval" {
  description = "Seconds between ALB health checks of one task."
  type        = number
  default     = 10
}

variable "health_check_timeout" {
  description = "Seconds the ALB waits for a health check answer; below the interval."
  type        = number
  default     = 5

  validation {
    condition     = var.health_check_timeout >= 2 && var.health_check_timeout < var.health_check_interval
    error_message = "health_check_timeout must be at least 2 and below health_check_interval."
  }
}

variable "health_check_healthy_threshold" {
  description = "Consecutive successes before the ALB sends traffic to a new task."
  type        = number
  default     = 2
}

variable "health_check_unhealthy_threshold" {
  description = "Consecutive failures before the ALB stops sending traffic to a task."
  type        = number
  default     = 2
}

# ---- Tiergate's own timing (set in the task definition's environment) --------------------

variable "keepalive_idle_timeout" {
  description = "Tiergate's http.idle_timeout in seconds: how long an idle keep-alive connection stays open. Above alb_idle_timeout."
  type        = number
  default     = 75
}

variable "drain_delay" {
  description = "Tiergate's shutdown.drain_delay in seconds: after SIGTERM, how long it keeps serving with Connection: close before it stops accepting."
  type        = number
  default     = 5
}

variable "shutdown_timeout" {
  description = "Tiergate's shutdown.timeout in seconds: the whole budget from SIGTERM to exit. Above drain_delay and below stop_timeout."
  type        = number
  default     = 25

  validation {
    condition     = var.shutdown_timeout > var.drain_delay && var.shutdown_timeout < var.stop_timeout
    error_message = "shutdown_timeout must be above drain_delay and below stop_timeout (ECS sends SIGKILL at stop_timeout)."
  }
}

variable "stop_timeout" {
  description = "Container stopTimeout in seconds: ECS sends SIGKILL this long after SIGTERM (Fargate allows up to 120)."
  type        = number
  default     = 30

  validation {
    condition     = var.stop_timeout >= 2 && var.stop_timeout <= 120
    error_message = "stop_timeout must be between 2 and 120 (Fargate's limit)."
  }
}

# ---- service ----------------------------------------------------------------------------

variable "image_tag" {
  description = "Tag (or @sha256 digest suffix) of the Tiergate image in the module's ECR repository that Terraform registers. The pipeline registers later revisions itself (docs/deploy-aws.md)."
  type        = string
}

variable "container_port" {
  description = "Port of Tiergate's public listener, the container port and the target group port (Tiergate reads it from PORT)."
  type        = number
  default     = 8080
}

variable "admin_port" {
  description = "Port of Tiergate's admin listener (/metrics, /livez, /readyz, /admin/*)."
  type        = number
  default     = 9090

  validation {
    condition     = var.admin_port != var.container_port
    error_message = "admin_port must differ from container_port: /metrics and /admin/* stay off the public port."
  }
}

variable "admin_ingress_cidrs" {
  description = "CIDRs inside the VPC (or peered) allowed to reach the admin port. Non-empty (or admin_ingress_security_group_ids non-empty) binds the admin listener to all interfaces instead of loopback; the admin token then guards /admin/*."
  type        = list(string)
  default     = []
}

variable "admin_ingress_security_group_ids" {
  description = "Security groups (bastions, operators' tasks, a central Prometheus) allowed to reach the admin port."
  type        = list(string)
  default     = []
}

variable "cpu" {
  description = "Task CPU units (1024 = 1 vCPU), Tiergate and the collector together."
  type        = number
  default     = 512
}

variable "memory" {
  description = "Task memory in MiB, Tiergate and the collector together; must be a Fargate pair with cpu."
  type        = number
  default     = 1024
}

variable "cpu_architecture" {
  description = "ARM64 (Graviton, about 20 % cheaper) or X86_64; the pipeline builds both."
  type        = string
  default     = "ARM64"

  validation {
    condition     = contains(["ARM64", "X86_64"], var.cpu_architecture)
    error_message = "cpu_architecture must be ARM64 or X86_64."
  }
}

variable "deployment_color" {
  description = "Tiergate's deployment.color, shown in /health and logs."
  type        = string
  default     = "blue"
}

variable "log_level" {
  description = "RUST_LOG filter."
  type        = string
  default     = "info"
}

variable "log_retention_days" {
  description = "Retention of the task and collector logs."
  type        = number
  default     = 30
}

variable "desired_count" {
  description = "Tasks at creation; autoscaling moves it between min_capacity and max_capacity afterwards."
  type        = number
  default     = 2
}

variable "min_capacity" {
  description = "Fewest tasks autoscaling keeps (one per AZ at least)."
  type        = number
  default     = 2
}

variable "max_capacity" {
  description = "Most tasks autoscaling starts. Size database.pool_max_size so that max_capacity x 2 pools x pool size (plus a deployment's extra tasks) stays under Aurora's max_connections."
  type        = number
  default     = 10

  validation {
    condition     = var.max_capacity >= var.min_capacity
    error_message = "max_capacity must be at least min_capacity."
  }
}

variable "cpu_target_percent" {
  description = "Target-tracking goal for the service's average CPU."
  type        = number
  default     = 60
}

variable "requests_per_target" {
  description = "Target-tracking goal for ALB requests per task per minute."
  type        = number
  default     = 6000
}

variable "health_check_grace_period" {
  description = "Seconds ECS ignores failing ALB health checks of a new task (start-up: connect, migrate check, first readiness)."
  type        = number
  default     = 30
}

variable "enable_execute_command" {
  description = "ECS Exec into tasks (for `tiergate fleet`, psql checks). Grants the task role the SSM messages channel."
  type        = bool
  default     = false
}

variable "extra_environment" {
  description = "More environment for the Tiergate container, e.g. TIERGATE_DATABASE__POOL_MAX_SIZE. Checked by `tiergate config check` at start (exit 78 trips the circuit breaker)."
  type        = map(string)
  default     = {}
}

# ---- metrics ------------------------------------------------------------------------------

variable "metrics_destination" {
  description = "Where the collector sidecar ships the scraped /metrics: cloudwatch (EMF, CloudWatch alarms on Tiergate's metrics) or amp (Amazon Managed Prometheus, alert rules there)."
  type        = string
  default     = "cloudwatch"

  validation {
    condition     = contains(["cloudwatch", "amp"], var.metrics_destination)
    error_message = "metrics_destination must be cloudwatch or amp."
  }
}

variable "amp_workspace_arn" {
  description = "Existing Amazon Managed Prometheus workspace for metrics_destination = amp; null creates one."
  type        = string
  default     = null
}

variable "collector_image" {
  description = "AWS Distro for OpenTelemetry collector image (pin a digest in production)."
  type        = string
  default     = "public.ecr.aws/aws-observability/aws-otel-collector:v0.45.1"
}

variable "scrape_interval" {
  description = "How often the collector scrapes Tiergate's /metrics."
  type        = string
  default     = "30s"
}

# ---- data -------------------------------------------------------------------------------

variable "db_engine_version" {
  description = "Aurora PostgreSQL version."
  type        = string
  default     = "16.6"
}

variable "db_parameter_group_family" {
  description = "Parameter group family matching db_engine_version."
  type        = string
  default     = "aurora-postgresql16"
}

variable "db_instance_class" {
  description = "Instance class of the writer and the reader."
  type        = string
  default     = "db.t4g.medium"
}

variable "db_name" {
  description = "Database Tiergate uses."
  type        = string
  default     = "tiergate"
}

variable "db_username" {
  description = "Master user Tiergate connects as."
  type        = string
  default     = "tiergate"
}

variable "db_backup_retention_days" {
  description = "Days of automated Aurora backups (point-in-time recovery window)."
  type        = number
  default     = 7
}

variable "db_deletion_protection" {
  description = "Refuse to delete the Aurora cluster (turn off before a teardown)."
  type        = bool
  default     = true
}

variable "db_ca_cert_identifier" {
  description = "RDS certificate authority of the instances; the task trusts the RDS global bundle, which covers all of them."
  type        = string
  default     = "rds-ca-rsa2048-g1"
}

variable "redis_node_type" {
  description = "ElastiCache node type."
  type        = string
  default     = "cache.t4g.small"
}

variable "redis_engine_version" {
  description = "ElastiCache Redis OSS version."
  type        = string
  default     = "7.1"
}

variable "redis_replicas" {
  description = "Replicas beside the primary (at least 1, for Multi-AZ failover)."
  type        = number
  default     = 1

  validation {
    condition     = var.redis_replicas >= 1 && var.redis_replicas <= 5
    error_message = "redis_replicas must be 1 to 5: automatic failover needs a replica."
  }
}

variable "redis_snapshot_retention_days" {
  description = "Days of Redis snapshots. The cache holds nothing PostgreSQL doesn't, so 1 is enough."
  type        = number
  default     = 1
}

# ---- alarms -----------------------------------------------------------------------------

variable "alarm_topic_arn" {
  description = "SNS topic for alarms and recoveries; null creates an encrypted one (subscribe to it yourself)."
  type        = string
  default     = null
}

variable "alarm_5xx_per_minute" {
  description = "ALB and target 5xx answers per minute that raise an alarm."
  type        = number
  default     = 10
}

variable "alarm_p99_seconds" {
  description = "p99 target response time (seconds) that raises an alarm."
  type        = number
  default     = 1
}

variable "alarm_shed_per_minute" {
  description = "Requests shed by Tiergate (503 overloaded) per minute that raise an alarm."
  type        = number
  default     = 1
}

variable "alarm_db_cpu_percent" {
  description = "Aurora CPU (either instance) that raises an alarm."
  type        = number
  default     = 80
}

variable "alarm_db_connections" {
  description = "Aurora connections (per instance) that raise an alarm; db.t4g.medium allows about 400."
  type        = number
  default     = 300
}

variable "alarm_redis_memory_percent" {
  description = "ElastiCache DatabaseMemoryUsagePercentage that raises an alarm."
  type        = number
  default     = 80
}

# ---- pipeline ---------------------------------------------------------------------------

variable "github_repository" {
  description = "owner/name of the GitHub repository whose deploy workflow may push and deploy (OIDC, no keys); null for none."
  type        = string
  default     = null

  validation {
    condition     = var.github_repository == null || can(regex("^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$", var.github_repository))
    error_message = "github_repository must be owner/name, without wildcards."
  }
}

variable "github_environment" {
  description = "GitHub environment the deploy job runs in; the role trusts only that environment."
  type        = string
  default     = "production"
}

variable "create_github_oidc_provider" {
  description = "Create the account's token.actions.githubusercontent.com OIDC provider (there is one per account; false when it exists)."
  type        = bool
  default     = true
}
