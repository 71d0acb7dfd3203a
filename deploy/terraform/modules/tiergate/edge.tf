# Edge: the ALB, its two listeners and the target group.
#
# The numbers here pair with Tiergate's settings (docs/deploy-aws.md, "Pairings"):
#   idle_timeout          < http.idle_timeout         the ALB closes idle connections first
#   deregistration_delay >= shutdown.drain_delay      no request reaches a stopped listener
#   health_check.path     = /readyz on container_port 503 while starting and once SIGTERM came
# The variable validations enforce the first two; gateway/tests/api/terraform.rs checks
# them against the real binary's settings.

resource "aws_lb" "this" {
  #checkov:skip=CKV2_AWS_76:The web ACL, with its managed rule groups (Log4j's AMR among them), is passed in through var.waf_web_acl_arn and owned outside this module.
  #checkov:skip=CKV2_AWS_28:The WAF association is optional (var.waf_web_acl_arn, resource aws_wafv2_web_acl_association.this); rule sets are the owning team's choice.
  #checkov:skip=CKV_AWS_91:Access logs are optional (var.alb_access_logs_bucket): the bucket and its ELB-account policy usually belong to a central logging account.
  name                       = var.name
  load_balancer_type         = "application"
  internal                   = false
  security_groups            = [aws_security_group.alb.id]
  subnets                    = aws_subnet.public[*].id
  idle_timeout               = var.alb_idle_timeout
  drop_invalid_header_fields = true
  enable_deletion_protection = var.alb_deletion_protection
  tags                       = local.tags

  dynamic "access_logs" {
    for_each = var.alb_access_logs_bucket == null ? [] : [var.alb_access_logs_bucket]
    content {
      bucket  = access_logs.value
      prefix  = var.name
      enabled = true
    }
  }
}

resource "aws_lb_target_group" "this" {
  #checkov:skip=CKV_AWS_378:TLS ends at the ALB; ALB to task traffic stays inside the VPC between two security groups. Tiergate can serve HTTPS (listen.https) if policy demands re-encryption.
  name                 = "${var.name}-${var.container_port}"
  target_type          = "ip"
  protocol             = "HTTP"
  port                 = var.container_port
  vpc_id               = aws_vpc.this.id
  deregistration_delay = var.deregistration_delay
  tags                 = local.tags

  health_check {
    enabled             = true
    protocol            = "HTTP"
    port                = "traffic-port"
    path                = var.health_check_path
    matcher             = "200"
    interval            = var.health_check_interval
    timeout             = var.health_check_timeout
    healthy_threshold   = var.health_check_healthy_threshold
    unhealthy_threshold = var.health_check_unhealthy_threshold
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.this.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = var.ssl_policy
  certificate_arn   = var.certificate_arn
  tags              = local.tags

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.this.arn
  }
}

resource "aws_lb_listener" "http" {
  #checkov:skip=CKV_AWS_2:This listener only redirects to HTTPS; it forwards nothing.
  #checkov:skip=CKV_AWS_103:This listener only redirects to HTTPS; it has no TLS to configure.
  load_balancer_arn = aws_lb.this.arn
  port              = 80
  protocol          = "HTTP"
  tags              = local.tags

  default_action {
    type = "redirect"
    redirect {
      protocol    = "HTTPS"
      port        = "443"
      status_code = "HTTP_301"
    }
  }
}

resource "aws_wafv2_web_acl_association" "this" {
  count        = var.waf_web_acl_arn == null ? 0 : 1
  resource_arn = aws_lb.this.arn
  web_acl_arn  = var.waf_web_acl_arn
}
