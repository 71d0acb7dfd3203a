# Shared pieces: names, the account and region, and the one KMS key that encrypts
# everything this module stores (logs, secrets, database, cache, alarm topic, images).

data "aws_caller_identity" "current" {}
data "aws_region" "current" {}
data "aws_partition" "current" {}

data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:Only the first var.az_count zones (in name order) are used, and the subnets pin them once created; a zone AWS adds later changes neither.
  state = "available"
  filter {
    name   = "opt-in-status"
    values = ["opt-in-not-required"]
  }
}

locals {
  account_id = data.aws_caller_identity.current.account_id
  region     = data.aws_region.current.region
  partition  = data.aws_partition.current.partition
  azs        = slice(data.aws_availability_zones.available.names, 0, var.az_count)
  tags       = merge({ "app" = var.name, "managed-by" = "terraform" }, var.tags)
}

resource "aws_kms_key" "this" {
  description             = "${var.name}: logs, secrets, Aurora, ElastiCache, SNS, ECR"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
  tags                    = local.tags
}

resource "aws_kms_alias" "this" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.this.key_id
}

# The account's administrators manage the key through IAM; the services below use it on
# the account's behalf. CloudWatch Logs, and CloudWatch and AMP (notifications to the
# encrypted alarm topic) call KMS as themselves, so they are named here.
data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_109:A key policy's "*" resource means this key only; the account statement is AWS's default key policy, which hands administration to IAM.
  #checkov:skip=CKV_AWS_111:A key policy's "*" resource means this key only; service principals are limited by their encryption context or source.
  #checkov:skip=CKV_AWS_356:A key policy's "*" resource means this key only (key policies cannot name the key's own ARN before it exists).
  statement {
    sid       = "AccountAdministersThroughIam"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid = "CloudWatchLogsEncryptsThisModulesLogGroups"
    actions = [
      "kms:Encrypt*",
      "kms:Decrypt*",
      "kms:ReEncrypt*",
      "kms:GenerateDataKey*",
      "kms:Describe*",
    ]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${local.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:*"]
    }
  }

  statement {
    sid       = "AlarmsPublishToTheEncryptedTopic"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com", "aps.amazonaws.com"]
    }
  }
}
