# Data tier, in the isolated subnets.
#
# Aurora PostgreSQL: a writer and a reader in different zones. Tiergate's writer pool
# gets the cluster endpoint, its reader pool the reader endpoint. Storage is encrypted
# with the module's key; the cluster parameter group refuses unencrypted connections
# (rds.force_ssl), and Tiergate verifies the server (sslmode=verify-full against the RDS
# CA bundle baked into the image).
#
# ElastiCache Redis OSS: a primary and var.redis_replicas replicas in other zones with
# automatic Multi-AZ failover; TLS required in transit, AUTH token from Secrets Manager,
# encrypted at rest. The primary endpoint follows a failover; Tiergate reconnects.

resource "aws_db_subnet_group" "this" {
  name       = var.name
  subnet_ids = aws_subnet.isolated[*].id
  tags       = local.tags
}

resource "aws_rds_cluster_parameter_group" "this" {
  name        = "${var.name}-${var.db_parameter_group_family}"
  family      = var.db_parameter_group_family
  description = "Tiergate: TLS only, TLS 1.2 at least"
  tags        = local.tags

  parameter {
    name         = "rds.force_ssl"
    value        = "1"
    apply_method = "pending-reboot"
  }

  parameter {
    name         = "ssl_min_protocol_version"
    value        = "TLSv1.2"
    apply_method = "pending-reboot"
  }

  # Schema changes (migrations) and statements slower than a second go to the log.
  parameter {
    name  = "log_statement"
    value = "ddl"
  }

  parameter {
    name  = "log_min_duration_statement"
    value = "1000"
  }

  lifecycle {
    create_before_destroy = true
  }
}

# Created here rather than by RDS, so it is encrypted and expires.
resource "aws_cloudwatch_log_group" "postgresql" {
  #checkov:skip=CKV_AWS_338:Retention is var.log_retention_days; a year of PostgreSQL logs is a cost decision the variable leaves to the team.
  name              = "/aws/rds/cluster/${var.name}/postgresql"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.this.arn
  tags              = local.tags
}

resource "aws_rds_cluster" "this" {
  #checkov:skip=CKV2_AWS_8:Aurora's own continuous backups (backup_retention_period, point-in-time restore) cover this cluster; an AWS Backup plan is an account-wide choice made outside this module.
  cluster_identifier                  = var.name
  engine                              = "aurora-postgresql"
  engine_mode                         = "provisioned"
  engine_version                      = var.db_engine_version
  database_name                       = var.db_name
  master_username                     = var.db_username
  master_password                     = random_password.db.result
  port                                = local.db_port
  db_subnet_group_name                = aws_db_subnet_group.this.name
  vpc_security_group_ids              = [aws_security_group.db.id]
  db_cluster_parameter_group_name     = aws_rds_cluster_parameter_group.this.name
  storage_encrypted                   = true
  kms_key_id                          = aws_kms_key.this.arn
  backup_retention_period             = var.db_backup_retention_days
  preferred_backup_window             = "02:00-03:00"
  preferred_maintenance_window        = "sun:03:30-sun:04:30"
  copy_tags_to_snapshot               = true
  deletion_protection                 = var.db_deletion_protection
  skip_final_snapshot                 = false
  final_snapshot_identifier           = "${var.name}-final"
  enabled_cloudwatch_logs_exports     = ["postgresql"]
  iam_database_authentication_enabled = true
  tags                                = local.tags

  depends_on = [aws_cloudwatch_log_group.postgresql]
}

# Two instances: Aurora makes the first available one the writer, the other a reader
# behind the reader endpoint; on a writer failure the reader is promoted.
resource "aws_rds_cluster_instance" "this" {
  count                                 = 2
  identifier                            = "${var.name}-${count.index}"
  cluster_identifier                    = aws_rds_cluster.this.id
  engine                                = aws_rds_cluster.this.engine
  engine_version                        = aws_rds_cluster.this.engine_version
  instance_class                        = var.db_instance_class
  db_subnet_group_name                  = aws_db_subnet_group.this.name
  availability_zone                     = local.azs[count.index]
  ca_cert_identifier                    = var.db_ca_cert_identifier
  publicly_accessible                   = false
  auto_minor_version_upgrade            = true
  promotion_tier                        = count.index
  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.this.arn
  performance_insights_retention_period = 7
  monitoring_interval                   = 60
  monitoring_role_arn                   = aws_iam_role.rds_monitoring.arn
  tags                                  = local.tags
}

resource "aws_iam_role" "rds_monitoring" {
  name               = "${var.name}-rds-monitoring"
  assume_role_policy = data.aws_iam_policy_document.rds_monitoring_assume.json
  tags               = local.tags
}

data "aws_iam_policy_document" "rds_monitoring_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["monitoring.rds.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

resource "aws_elasticache_subnet_group" "this" {
  name       = var.name
  subnet_ids = aws_subnet.isolated[*].id
  tags       = local.tags
}

resource "aws_cloudwatch_log_group" "redis_slow" {
  #checkov:skip=CKV_AWS_338:Retention is var.log_retention_days; a year of Redis slow logs is a cost decision the variable leaves to the team.
  name              = "/elasticache/${var.name}/slow-log"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.this.arn
  tags              = local.tags
}

resource "aws_elasticache_replication_group" "this" {
  replication_group_id       = var.name
  description                = "Tiergate L2 cache and invalidation bus"
  engine                     = "redis"
  engine_version             = var.redis_engine_version
  node_type                  = var.redis_node_type
  num_cache_clusters         = 1 + var.redis_replicas
  port                       = local.redis_port
  subnet_group_name          = aws_elasticache_subnet_group.this.name
  security_group_ids         = [aws_security_group.redis.id]
  automatic_failover_enabled = true
  multi_az_enabled           = true
  at_rest_encryption_enabled = true
  kms_key_id                 = aws_kms_key.this.arn
  transit_encryption_enabled = true
  transit_encryption_mode    = "required"
  auth_token                 = random_password.redis.result
  auth_token_update_strategy = "ROTATE"
  snapshot_retention_limit   = var.redis_snapshot_retention_days
  snapshot_window            = "01:00-02:00"
  maintenance_window         = "sun:04:30-sun:05:30"
  auto_minor_version_upgrade = true
  tags                       = local.tags

  log_delivery_configuration {
    destination      = aws_cloudwatch_log_group.redis_slow.name
    destination_type = "cloudwatch-logs"
    log_format       = "json"
    log_type         = "slow-log"
  }
}
