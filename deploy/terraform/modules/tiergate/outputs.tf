# What the deploy workflow, operators and other stacks need. The workflow's GitHub
# environment variables are set from these (docs/deploy-aws.md, "Pipeline").

output "alb_dns_name" {
  description = "Point your DNS name (the certificate's) at this, as an alias or CNAME."
  value       = aws_lb.this.dns_name
}

output "alb_zone_id" {
  description = "Hosted zone of the ALB, for a Route 53 alias record."
  value       = aws_lb.this.zone_id
}

output "ecr_repository_url" {
  description = "Where the pipeline pushes images (ECR_REPOSITORY is its name)."
  value       = aws_ecr_repository.this.repository_url
}

output "ecs_cluster_name" {
  description = "ECS_CLUSTER for the deploy workflow."
  value       = aws_ecs_cluster.this.name
}

output "ecs_service_name" {
  description = "ECS_SERVICE for the deploy workflow."
  value       = aws_ecs_service.this.name
}

output "task_definition_family" {
  description = "Family of the service's task definition (TASK_FAMILY)."
  value       = aws_ecs_task_definition.tiergate.family
}

output "migrate_task_definition_family" {
  description = "Family of the one-off `tiergate migrate` task (MIGRATE_FAMILY)."
  value       = aws_ecs_task_definition.migrate.family
}

output "task_subnet_ids" {
  description = "Private subnets for run-task (MIGRATE_SUBNETS, comma-separated)."
  value       = aws_subnet.private[*].id
}

output "task_security_group_id" {
  description = "Security group for run-task (MIGRATE_SECURITY_GROUP)."
  value       = aws_security_group.task.id
}

output "deploy_role_arn" {
  description = "Role the deploy workflow assumes through OIDC (AWS_ROLE_ARN); null without var.github_repository."
  value       = local.pipeline ? aws_iam_role.deploy[0].arn : null
}

output "alarm_topic_arn" {
  description = "SNS topic the alarms notify; subscribe your on-call to it."
  value       = local.alarm_topic_arn
}

output "database_secret_arn" {
  description = "Aurora credentials and Tiergate's URLs (for psql through ECS Exec, or a rotation)."
  value       = aws_secretsmanager_secret.database.arn
}

output "admin_token_secret_arn" {
  description = "The admin token (for `tiergate fleet` and /admin/* calls from inside the VPC)."
  value       = aws_secretsmanager_secret.admin_token.arn
}

output "metrics_namespace" {
  description = "CloudWatch namespace of Tiergate's own metrics (metrics_destination = cloudwatch)."
  value       = var.metrics_destination == "cloudwatch" ? local.metrics_namespace : null
}

output "amp_workspace_arn" {
  description = "The AMP workspace the metrics go to (metrics_destination = amp)."
  value       = local.amp_workspace_arn
}
