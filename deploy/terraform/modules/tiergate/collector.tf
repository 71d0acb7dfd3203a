# The metrics path: Tiergate serves Prometheus text on its admin listener; the ADOT
# collector sidecar scrapes it at 127.0.0.1 (containers of an awsvpc task share the
# network namespace, so loopback reaches the other container) and ships it on.

locals {
  metrics_namespace = "Tiergate/${var.name}"
  create_amp        = var.metrics_destination == "amp" && var.amp_workspace_arn == null
  amp_workspace_arn = var.metrics_destination != "amp" ? null : (local.create_amp ? aws_prometheus_workspace.this[0].arn : var.amp_workspace_arn)
  amp_workspace_id  = local.amp_workspace_arn == null ? null : element(split("/", local.amp_workspace_arn), 1)

  collector_config = var.metrics_destination == "amp" ? templatefile("${path.module}/collector/amp.yaml.tftpl", {
    region           = local.region
    admin_port       = var.admin_port
    scrape_interval  = var.scrape_interval
    service          = var.name
    remote_write_url = "https://aps-workspaces.${local.region}.amazonaws.com/workspaces/${local.amp_workspace_id}/api/v1/remote_write"
    }) : templatefile("${path.module}/collector/cloudwatch.yaml.tftpl", {
    region          = local.region
    admin_port      = var.admin_port
    scrape_interval = var.scrape_interval
    service         = var.name
    namespace       = local.metrics_namespace
    log_group       = aws_cloudwatch_log_group.metrics.name
  })
}

resource "aws_ssm_parameter" "collector_config" {
  name        = "/${var.name}/otel-collector-config"
  description = "ADOT collector configuration (AOT_CONFIG_CONTENT) of the ${var.name} tasks"
  type        = "SecureString"
  key_id      = aws_kms_key.this.arn
  value       = local.collector_config
  tags        = local.tags
}

# EMF lines land here; CloudWatch extracts the metrics from them.
resource "aws_cloudwatch_log_group" "metrics" {
  #checkov:skip=CKV_AWS_338:These are EMF records whose metrics CloudWatch keeps for 15 months anyway; keeping the raw lines for a year would only add cost.
  name              = "/ecs/${var.name}/metrics"
  retention_in_days = 7
  kms_key_id        = aws_kms_key.this.arn
  tags              = local.tags
}

resource "aws_prometheus_workspace" "this" {
  count       = local.create_amp ? 1 : 0
  alias       = var.name
  kms_key_arn = aws_kms_key.this.arn
  tags        = local.tags
}
