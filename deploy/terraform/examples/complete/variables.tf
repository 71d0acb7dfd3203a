variable "region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "eu-west-1"
}

variable "environment" {
  description = "Environment name, added to every resource as a tag."
  type        = string
  default     = "production"
}

variable "certificate_arn" {
  description = "ACM certificate for the public host name, in var.region."
  type        = string
}

variable "image_tag" {
  description = "Image tag in the stack's ECR repository that the first apply runs (docs/deploy-aws.md, step 3)."
  type        = string
}

variable "github_repository" {
  description = "owner/name of the repository whose deploy workflow deploys this stack; null for none."
  type        = string
  default     = null
}

variable "alarm_topic_arn" {
  description = "Existing SNS topic for alarms; null lets the module create one."
  type        = string
  default     = null
}
