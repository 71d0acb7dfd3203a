# Secrets: generated here, stored in Secrets Manager (encrypted with the module's key),
# injected by ECS as the environment variables Tiergate reads:
#
#   DATABASE_URL          <- tiergate/database  key url         (writer, sslmode=verify-full)
#   DATABASE_READER_URL   <- tiergate/database  key reader_url  (reader endpoint, same)
#   REDIS_URL             <- tiergate/redis     key url         (rediss://:AUTH@primary:6379)
#   TIERGATE_ADMIN__TOKEN <- tiergate/admin-token               (the whole secret)
#
# Whole URLs rather than DB_HOST/DB_USER/DB_PASSWORD: the URL Tiergate composes from
# those has no sslmode, and the reader needs a URL of its own anyway.
#
# The generated values are in the Terraform state: keep the state in an encrypted,
# access-controlled backend. Passwords are alphanumeric, so they need no escaping in a
# URL and pass both RDS's and ElastiCache's character rules.

resource "random_password" "db" {
  length  = 40
  special = false
}

resource "random_password" "redis" {
  length  = 64
  special = false
}

resource "random_password" "admin_token" {
  length  = 48
  special = false
}

locals {
  db_port    = 5432
  redis_port = 6379

  database_secret = {
    username    = var.db_username
    password    = random_password.db.result
    host        = aws_rds_cluster.this.endpoint
    reader_host = aws_rds_cluster.this.reader_endpoint
    port        = local.db_port
    dbname      = var.db_name
    url         = "postgres://${var.db_username}:${random_password.db.result}@${aws_rds_cluster.this.endpoint}:${local.db_port}/${var.db_name}?sslmode=verify-full"
    reader_url  = "postgres://${var.db_username}:${random_password.db.result}@${aws_rds_cluster.this.reader_endpoint}:${local.db_port}/${var.db_name}?sslmode=verify-full"
  }

  redis_secret = {
    auth_token = random_password.redis.result
    url        = "rediss://:${random_password.redis.result}@${aws_elasticache_replication_group.this.primary_endpoint_address}:${local.redis_port}"
  }
}

resource "aws_secretsmanager_secret" "database" {
  #checkov:skip=CKV2_AWS_57:Rotation would need a Lambda that changes the Aurora password and rewrites both URLs together; rotate by replacing random_password.db and redeploying (docs/deploy-aws.md).
  name                    = "${var.name}/database"
  description             = "Aurora credentials and Tiergate's DATABASE_URL / DATABASE_READER_URL"
  kms_key_id              = aws_kms_key.this.arn
  recovery_window_in_days = 7
  tags                    = local.tags
}

resource "aws_secretsmanager_secret_version" "database" {
  secret_id     = aws_secretsmanager_secret.database.id
  secret_string = jsonencode(local.database_secret)
}

resource "aws_secretsmanager_secret" "redis" {
  #checkov:skip=CKV2_AWS_57:Rotation would need a Lambda driving ElastiCache's ROTATE token strategy and the URL together; rotate by replacing random_password.redis and redeploying (docs/deploy-aws.md).
  name                    = "${var.name}/redis"
  description             = "ElastiCache AUTH token and Tiergate's REDIS_URL"
  kms_key_id              = aws_kms_key.this.arn
  recovery_window_in_days = 7
  tags                    = local.tags
}

resource "aws_secretsmanager_secret_version" "redis" {
  secret_id     = aws_secretsmanager_secret.redis.id
  secret_string = jsonencode(local.redis_secret)
}

resource "aws_secretsmanager_secret" "admin_token" {
  #checkov:skip=CKV2_AWS_57:Tiergate reads the token at start; rotate by replacing random_password.admin_token and redeploying (docs/deploy-aws.md).
  name                    = "${var.name}/admin-token"
  description             = "Bearer token of Tiergate's /admin/* endpoints (TIERGATE_ADMIN__TOKEN)"
  kms_key_id              = aws_kms_key.this.arn
  recovery_window_in_days = 7
  tags                    = local.tags
}

resource "aws_secretsmanager_secret_version" "admin_token" {
  secret_id     = aws_secretsmanager_secret.admin_token.id
  secret_string = random_password.admin_token.result
}
