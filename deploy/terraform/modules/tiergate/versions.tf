# Terraform and provider versions. The module states the range it was written against;
# the root module (examples/complete) pins exact versions through its lock file.
terraform {
  # 1.9: variable validations may refer to other variables (the timing pairings below).
  required_version = ">= 1.9.0, < 2.0.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.0.0, < 7.0.0"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.6.0, < 4.0.0"
    }
  }
}
