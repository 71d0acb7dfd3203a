output "alb_dns_name" {
  description = "Point the certificate's host name here."
  value       = module.tiergate.alb_dns_name
}

output "ecr_repository_url" {
  description = "Push images here."
  value       = module.tiergate.ecr_repository_url
}

output "deploy_role_arn" {
  description = "AWS_ROLE_ARN of the deploy workflow."
  value       = module.tiergate.deploy_role_arn
}

output "pipeline_variables" {
  description = "The deploy workflow's GitHub environment variables."
  value = {
    AWS_REGION             = var.region
    AWS_ROLE_ARN           = module.tiergate.deploy_role_arn
    ECR_REPOSITORY         = module.tiergate.ecr_repository_url
    ECS_CLUSTER            = module.tiergate.ecs_cluster_name
    ECS_SERVICE            = module.tiergate.ecs_service_name
    TASK_FAMILY            = module.tiergate.task_definition_family
    MIGRATE_FAMILY         = module.tiergate.migrate_task_definition_family
    MIGRATE_SUBNETS        = join(",", module.tiergate.task_subnet_ids)
    MIGRATE_SECURITY_GROUP = module.tiergate.task_security_group_id
  }
}
