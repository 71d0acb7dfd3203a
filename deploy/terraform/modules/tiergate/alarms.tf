# Alarms, all to one SNS topic (var.alarm_topic_arn, or one made here).
#
#   edge     ALB 5xx (its own and the targets'), p99 target response time, unhealthy tasks
#   data     Aurora CPU and connections per instance, Redis memory and evictions per node
#   Tiergate load shedding (tiergate_http_shed_total) and the Redis circuit breaker
#            (tiergate_cache_l2_breaker_open): CloudWatch alarms on the collector's EMF
#            metrics, or Prometheus alert rules in AMP routed to the same topic

locals {
  alarm_topic_arn = var.alarm_topic_arn == null ? aws_sns_topic.alarms[0].arn : var.alarm_topic_arn
  alarm_actions   = [local.alarm_topic_arn]
  redis_members   = [for i in range(1 + var.redis_replicas) : format("%s-%03d", var.name, i + 1)]
}

resource "aws_sns_topic" "alarms" {
  count             = var.alarm_topic_arn == null ? 1 : 0
  name              = "${var.name}-alarms"
  kms_master_key_id = aws_kms_key.this.arn
  tags              = local.tags
}

resource "aws_sns_topic_policy" "alarms" {
  count  = var.alarm_topic_arn == null ? 1 : 0
  arn    = aws_sns_topic.alarms[0].arn
  policy = data.aws_iam_policy_document.alarm_topic.json
}

data "aws_iam_policy_document" "alarm_topic" {
  statement {
    sid       = "AccountManagesTheTopic"
    actions   = ["sns:Publish", "sns:Subscribe", "sns:GetTopicAttributes", "sns:SetTopicAttributes", "sns:ListSubscriptionsByTopic"]
    resources = ["arn:${local.partition}:sns:${local.region}:${local.account_id}:${var.name}-alarms"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid       = "AlarmsAndPrometheusAlertsPublish"
    actions   = ["sns:Publish"]
    resources = ["arn:${local.partition}:sns:${local.region}:${local.account_id}:${var.name}-alarms"]
    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com", "aps.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

# ---- edge ---------------------------------------------------------------------------------

resource "aws_cloudwatch_metric_alarm" "alb_5xx" {
  alarm_name          = "${var.name}-alb-5xx"
  alarm_description   = "The ALB itself answered 5xx (no healthy target, 502 from a closed connection, 504)."
  namespace           = "AWS/ApplicationELB"
  metric_name         = "HTTPCode_ELB_5XX_Count"
  dimensions          = { LoadBalancer = aws_lb.this.arn_suffix }
  statistic           = "Sum"
  period              = 60
  evaluation_periods  = 3
  datapoints_to_alarm = 2
  threshold           = var.alarm_5xx_per_minute
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "target_5xx" {
  alarm_name          = "${var.name}-target-5xx"
  alarm_description   = "Tiergate answered 5xx (503 unavailable or overloaded, 500)."
  namespace           = "AWS/ApplicationELB"
  metric_name         = "HTTPCode_Target_5XX_Count"
  dimensions          = { LoadBalancer = aws_lb.this.arn_suffix, TargetGroup = aws_lb_target_group.this.arn_suffix }
  statistic           = "Sum"
  period              = 60
  evaluation_periods  = 3
  datapoints_to_alarm = 2
  threshold           = var.alarm_5xx_per_minute
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "target_p99" {
  alarm_name          = "${var.name}-target-p99"
  alarm_description   = "p99 of the time Tiergate takes to answer, as the ALB measures it."
  namespace           = "AWS/ApplicationELB"
  metric_name         = "TargetResponseTime"
  dimensions          = { LoadBalancer = aws_lb.this.arn_suffix, TargetGroup = aws_lb_target_group.this.arn_suffix }
  extended_statistic  = "p99"
  period              = 60
  evaluation_periods  = 5
  datapoints_to_alarm = 3
  threshold           = var.alarm_p99_seconds
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "unhealthy_hosts" {
  alarm_name          = "${var.name}-unhealthy-tasks"
  alarm_description   = "Tasks failing the ALB health check (/readyz) for more than a deployment's moment."
  namespace           = "AWS/ApplicationELB"
  metric_name         = "UnHealthyHostCount"
  dimensions          = { LoadBalancer = aws_lb.this.arn_suffix, TargetGroup = aws_lb_target_group.this.arn_suffix }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 3
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

# ---- data ---------------------------------------------------------------------------------

resource "aws_cloudwatch_metric_alarm" "db_cpu" {
  count               = length(aws_rds_cluster_instance.this)
  alarm_name          = "${var.name}-db-${count.index}-cpu"
  alarm_description   = "Aurora instance CPU high: cache misses or a slow query."
  namespace           = "AWS/RDS"
  metric_name         = "CPUUtilization"
  dimensions          = { DBInstanceIdentifier = aws_rds_cluster_instance.this[count.index].identifier }
  statistic           = "Average"
  period              = 300
  evaluation_periods  = 3
  threshold           = var.alarm_db_cpu_percent
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "missing"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "db_connections" {
  count               = length(aws_rds_cluster_instance.this)
  alarm_name          = "${var.name}-db-${count.index}-connections"
  alarm_description   = "Aurora connections near the instance's limit: tasks x pools x database.pool_max_size is too large."
  namespace           = "AWS/RDS"
  metric_name         = "DatabaseConnections"
  dimensions          = { DBInstanceIdentifier = aws_rds_cluster_instance.this[count.index].identifier }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 5
  threshold           = var.alarm_db_connections
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "missing"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "redis_memory" {
  count               = length(local.redis_members)
  alarm_name          = "${local.redis_members[count.index]}-memory"
  alarm_description   = "Redis memory high: entries are evicted before their TTL, and the hit rate drops."
  namespace           = "AWS/ElastiCache"
  metric_name         = "DatabaseMemoryUsagePercentage"
  dimensions          = { CacheClusterId = local.redis_members[count.index] }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 3
  threshold           = var.alarm_redis_memory_percent
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "missing"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
  depends_on          = [aws_elasticache_replication_group.this]
}

resource "aws_cloudwatch_metric_alarm" "redis_evictions" {
  count               = length(local.redis_members)
  alarm_name          = "${local.redis_members[count.index]}-evictions"
  alarm_description   = "Redis evicts keys: the node is too small for the working set times cache.l2_ttl."
  namespace           = "AWS/ElastiCache"
  metric_name         = "Evictions"
  dimensions          = { CacheClusterId = local.redis_members[count.index] }
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 2
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
  depends_on          = [aws_elasticache_replication_group.this]
}

# ---- Tiergate's own metrics, through the collector (CloudWatch) --------------------------------

resource "aws_cloudwatch_metric_alarm" "shed" {
  count               = var.metrics_destination == "cloudwatch" ? 1 : 0
  alarm_name          = "${var.name}-shedding"
  alarm_description   = "Tiergate sheds load (503 overloaded): http.max_in_flight reached on some task. Scale out, or raise the limit if the database keeps up."
  namespace           = local.metrics_namespace
  metric_name         = "tiergate_http_shed" # tiergate_http_shed_total; the receiver drops _total
  dimensions          = { service = var.name }
  statistic           = "Sum"
  period              = 60
  evaluation_periods  = 3
  datapoints_to_alarm = 2
  threshold           = var.alarm_shed_per_minute
  comparison_operator = "GreaterThanOrEqualToThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "breaker" {
  count               = var.metrics_destination == "cloudwatch" ? 1 : 0
  alarm_name          = "${var.name}-redis-breaker-open"
  alarm_description   = "Tiergate's Redis circuit breaker is open on some task: reads skip the cache and go to PostgreSQL."
  namespace           = local.metrics_namespace
  metric_name         = "tiergate_cache_l2_breaker_open"
  dimensions          = { service = var.name }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 3
  datapoints_to_alarm = 2
  threshold           = 1
  comparison_operator = "GreaterThanOrEqualToThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

# ---- Tiergate's own metrics, through the collector (AMP) --------------------------------------

resource "aws_prometheus_rule_group_namespace" "tiergate" {
  count        = var.metrics_destination == "amp" ? 1 : 0
  name         = var.name
  workspace_id = local.amp_workspace_id
  data = yamlencode({
    groups = [{
      name = "tiergate"
      rules = [
        {
          alert       = "TiergateShedding"
          expr        = "sum(rate(tiergate_http_shed_total{service=\"${var.name}\"}[2m])) * 60 >= ${var.alarm_shed_per_minute}"
          "for"       = "2m"
          annotations = { summary = "Tiergate sheds load (503 overloaded): http.max_in_flight reached." }
        },
        {
          alert       = "TiergateRedisBreakerOpen"
          expr        = "max(tiergate_cache_l2_breaker_open{service=\"${var.name}\"}) >= 1"
          "for"       = "2m"
          annotations = { summary = "Tiergate's Redis circuit breaker is open: reads skip the cache." }
        },
      ]
    }]
  })
}

resource "aws_prometheus_alert_manager_definition" "this" {
  count        = local.create_amp ? 1 : 0
  workspace_id = local.amp_workspace_id
  definition = yamlencode({
    alertmanager_config = yamlencode({
      route = { receiver = "sns" }
      receivers = [{
        name        = "sns"
        sns_configs = [{ topic_arn = local.alarm_topic_arn, sigv4 = { region = local.region } }]
      }]
    })
  })
}
