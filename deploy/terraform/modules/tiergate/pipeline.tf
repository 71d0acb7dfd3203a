# The deploy workflow's identity: GitHub's OIDC token for one repository and one
# environment, exchanged for a role that can push to this repository's ECR and roll
# this service, and nothing else. No long-lived keys anywhere.

locals {
  pipeline       = var.github_repository != null
  github_oidc    = "token.actions.githubusercontent.com"
  oidc_provider  = local.pipeline ? (var.create_github_oidc_provider ? aws_iam_openid_connect_provider.github[0].arn : "arn:${local.partition}:iam::${local.account_id}:oidc-provider/${local.github_oidc}") : null
  task_def_arn   = "arn:${local.partition}:ecs:${local.region}:${local.account_id}:task-definition"
  ecs_cluster_id = "arn:${local.partition}:ecs:${local.region}:${local.account_id}:cluster/${var.name}"
}

resource "aws_iam_openid_connect_provider" "github" {
  count          = local.pipeline && var.create_github_oidc_provider ? 1 : 0
  url            = "https://${local.github_oidc}"
  client_id_list = ["sts.amazonaws.com"]
  tags           = local.tags
}

data "aws_iam_policy_document" "deploy_assume" {
  #checkov:skip=CKV_AWS_358:The sub claim is pinned to exactly repo:OWNER/NAME:environment:ENV (var.github_repository is validated as owner/name); checkov cannot read a variable's value.
  count = local.pipeline ? 1 : 0
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [local.oidc_provider]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.github_oidc}:aud"
      values   = ["sts.amazonaws.com"]
    }
    # Only jobs that run in the protected environment, so branch protection and the
    # environment's reviewers decide who deploys.
    condition {
      test     = "StringEquals"
      variable = "${local.github_oidc}:sub"
      values   = ["repo:${var.github_repository}:environment:${var.github_environment}"]
    }
  }
}

resource "aws_iam_role" "deploy" {
  count                = local.pipeline ? 1 : 0
  name                 = "${var.name}-deploy"
  assume_role_policy   = data.aws_iam_policy_document.deploy_assume[0].json
  max_session_duration = 3600
  tags                 = local.tags
}

data "aws_iam_policy_document" "deploy" {
  count = local.pipeline ? 1 : 0

  statement {
    sid       = "EcrLogin"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"] # the action has no resource-level permissions
  }

  statement {
    sid = "PushImages"
    actions = [
      "ecr:BatchCheckLayerAvailability",
      "ecr:BatchGetImage",
      "ecr:CompleteLayerUpload",
      "ecr:DescribeImages",
      "ecr:InitiateLayerUpload",
      "ecr:PutImage",
      "ecr:UploadLayerPart",
    ]
    resources = [aws_ecr_repository.this.arn]
  }

  statement {
    sid       = "RegisterRevisions"
    actions   = ["ecs:DescribeTaskDefinition", "ecs:RegisterTaskDefinition"]
    resources = ["*"] # neither action has resource-level permissions
  }

  statement {
    sid       = "RollTheService"
    actions   = ["ecs:DescribeServices", "ecs:UpdateService"]
    resources = [aws_ecs_service.this.id]
  }

  statement {
    sid       = "RunMigrations"
    actions   = ["ecs:RunTask"]
    resources = ["${local.task_def_arn}/${var.name}-migrate:*"]
    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [local.ecs_cluster_id]
    }
  }

  statement {
    sid       = "WatchMigrations"
    actions   = ["ecs:DescribeTasks"]
    resources = ["arn:${local.partition}:ecs:${local.region}:${local.account_id}:task/${var.name}/*"]
  }

  statement {
    sid       = "HandTheRolesToEcs"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.execution.arn, aws_iam_role.task.arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ecs-tasks.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "deploy" {
  count  = local.pipeline ? 1 : 0
  name   = "push-and-deploy"
  role   = aws_iam_role.deploy[0].id
  policy = data.aws_iam_policy_document.deploy[0].json
}
