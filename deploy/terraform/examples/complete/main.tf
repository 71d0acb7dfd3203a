# A root module that deploys the whole stack into one account and region with the
# module's defaults: copy this directory, set the variables in a terraform.tfvars, add a
# backend, and apply (docs/deploy-aws.md walks through it).

terraform {
  required_version = ">= 1.9.0, < 2.0.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 6.0"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }

  # Keep the state in S3, encrypted and versioned: it holds the generated passwords.
  # backend "s3" {
  #   bucket       = "my-terraform-state"
  #   key          = "tiergate/production.tfstate"
  #   region       = "eu-west-1"
  #   encrypt      = true
  #   use_lockfile = true
  # }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = { environment = var.environment }
  }
}

module "tiergate" {
  source = "../../modules/tiergate"

  name              = "tiergate"
  certificate_arn   = var.certificate_arn
  image_tag         = var.image_tag
  github_repository = var.github_repository
  alarm_topic_arn   = var.alarm_topic_arn
}
